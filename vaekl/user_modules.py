"""User modules: code outside the package that registers regularizers, metrics or datasets.

A run records the modules it needs in its config (``config.imports``, saved in config.json);
every entry point imports them before it reads a registry: ``experiments.train`` and
``launch.sweep`` (``--import=MODULE``, repeatable or comma-separated), ``experiments.evaluate``,
``experiments.report`` and :func:`vaekl.runs.load` (from config.json). A module is found on
``sys.path``, i.e. its directory must be on ``PYTHONPATH``.

Standard library only, so that any vaekl module may import it.
"""

from __future__ import annotations

from collections.abc import Iterable
import importlib
import re
import sys

FLAG = "import"
FLAG_HELP = ("A module to import before the config is built (it registers a regularizer, metric "
             "or dataset); repeatable or comma-separated. Recorded in the run's config.imports, "
             "so evaluation and runs.load import it too. Its directory must be on PYTHONPATH.")
_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class UserModuleError(ValueError):
    """A recorded or requested user module cannot be imported (one line)."""


def names(values: Iterable[str] | str | None) -> tuple[str, ...]:
    """Module names from flag values or a config field: comma-separated entries split,
    blanks dropped, duplicates removed (first occurrence kept)."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        for name in str(value).split(","):
            name = name.strip()
            if name and name not in out:
                out.append(name)
    return tuple(out)


def merge(*groups: Iterable[str] | str | None) -> tuple[str, ...]:
    """The module names of every group, in order, each once."""
    return names([n for g in groups for n in names(g)])


def import_all(modules: Iterable[str] | str | None) -> tuple[str, ...]:
    """Imports each module (already imported ones are not reloaded); returns their names.

    Raises:
      UserModuleError: a name that is not a module path, or a module that fails to import,
        on one line naming the module and the PYTHONPATH hint.
    """
    found = names(modules)
    for name in found:
        if not _NAME.fullmatch(name):
            raise UserModuleError(f"user module {name!r} is not a module name (e.g. my_regularizers "
                                  f"or mypkg.vae_extras; a file's directory goes on PYTHONPATH)")
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except Exception as e:  # pylint: disable=broad-except  (the module's own errors too)
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            raise UserModuleError(f"cannot import user module {name!r} ({reason}); put the directory "
                                  f"that holds it on PYTHONPATH (PYTHONPATH=DIR python -m ...)") from e
    return found
