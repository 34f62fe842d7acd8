"""The run directory's files: re-exported from :mod:`vaekl.runs`, which owns the layout.

Kept so that ``from vaekl import rundir; rundir.MetricsLog(...)`` keeps working.
"""

from vaekl.cli import quiet_library_logs
from vaekl.runs import (RESUMABLE_CHANGES, MetricsLog, check_config, image_grid, save_png,
                        write_config)

__all__ = ["RESUMABLE_CHANGES", "MetricsLog", "check_config", "image_grid", "quiet_library_logs",
           "save_png", "write_config"]
