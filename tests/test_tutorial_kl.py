"""docs/tutorial_kl.py runs end to end with a small setting (issue 21, item 6): every numerical
check in it (closed form against quadrature and Monte Carlo, the trained VAE's terms) holds."""

from __future__ import annotations

import os
import runpy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tutorial_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VAEKL_TUTORIAL_OUT", str(tmp_path))
    monkeypatch.setenv("VAEKL_TUTORIAL_STEPS", "60")
    monkeypatch.setenv("VAEKL_TUTORIAL_DRAWS", "50000")
    monkeypatch.delenv("VAEKL_TUTORIAL_RUN", raising=False)
    runpy.run_path(os.path.join(REPO, "docs", "tutorial_kl.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "dimensions active" in out and "Monte Carlo" in out
    assert os.path.getsize(tmp_path / "tutorial_kl.png") > 1000
    assert os.path.isdir(tmp_path / "tutorial_kl_run" / "checkpoints")
