"""Command-line entry points: absl's ``app.run`` with one-line errors for the user's mistakes.

    from vaekl import cli
    if __name__ == "__main__":
        cli.main(main)

A user error (:data:`USER_ERRORS`, a bad flag, a config-field typo, a missing config file)
prints ``error: <message>`` on stderr and exits with status :data:`EXIT_USER_ERROR`, without
a traceback; ``--verbosity=1`` or ``VAEKL_TRACEBACK=1`` adds the traceback. A config-field
typo names the nearest field (``--config.bta=4``: "did you mean beta?"). Other exceptions
are bugs and keep their traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import difflib
import logging as pylogging
import os
import re
import runpy
import signal
import sys
import threading
import traceback
from typing import Any, NoReturn

from absl import app
from absl import flags
from absl import logging

from vaekl import host_memory, rundir, user_modules
from vaekl.checkpoints import CorruptCheckpoint

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
               rundir.RunLocked, rundir.WriteFailed, app.UsageError, CorruptCheckpoint,
               FloatingPointError)  # a diverged run: its message says what to change


def one_line(e: BaseException) -> str:
    """The exception's message on one line (its type name if it has none)."""
    text = " ".join(str(e).split()) if str(e).strip() else type(e).__name__
    return text[1:-1] if isinstance(e, KeyError) and text[:1] == text[-1:] == "'" else text


_TRACEBACK_END = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")


def child_error(log_text: str, returncode: int, log_path: str) -> str:
    """One line for a failed child process (launchers' tables): its last ``error: ...`` line
    (this module's one-line errors), else its traceback's last line, else its last line; then
    how it ended and where its log is."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    message = next((line[len("error: "):] for line in reversed(lines) if line.startswith("error: ")), None)
    if message is None:
        message = next((line for line in reversed(lines) if _TRACEBACK_END.match(line)),
                       lines[-1] if lines else "")
    how = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit {returncode}"
    return f"{message[:240]} ({how}; log {log_path})" if message else f"({how}; log {log_path})"


def _traceback_wanted(argv: Sequence[str] | None = None) -> bool:
    if os.environ.get("VAEKL_TRACEBACK", "") not in ("", "0"):
        return True
    if flags.FLAGS.is_parsed():
        return flags.FLAGS["verbosity"].value >= 1
    for arg in argv or sys.argv:  # flags not parsed yet: read --verbosity=N by hand
        m = re.fullmatch(r"--?(?:verbosity|v)=(-?\d+)", arg)
        if m:
            return int(m.group(1)) >= 1
    return False


def fail(message: str, argv: Sequence[str] | None = None) -> NoReturn:
    """Prints ``error: message`` (after the traceback being handled, if wanted) and exits 2."""
    if _traceback_wanted(argv) and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _config_file(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return None


def _explain_flag_error(argv: Sequence[str], e: BaseException) -> str:
    """A one-line explanation of a failure while parsing flags: a config file that is missing
    or fails to load, or a config-field override naming no field."""
    overrides = [(m.group(1), m.group(2), arg) for arg in argv[1:]
                 for m in [re.match(r"^--?(\w+)\.([\w.]+)(?:=|$)", arg)] if m]
    for name in sorted({n for n, _, _ in overrides}):
        path = _config_file(argv, name)
        if path is None:
            continue
        if not os.path.isfile(path):
            return f"--{name}: config file {path} not found"
        try:
            config = runpy.run_path(path)["get_config"]()
        except Exception as load_error:  # pylint: disable=broad-except
            return f"--{name}: cannot load {path}: {type(load_error).__name__}: {one_line(load_error)}"
        for flag, field, arg in overrides:
            top = field.split(".")[0]
            if flag == name and top not in config:
                near = difflib.get_close_matches(top, [str(k) for k in config.keys()], n=1)
                hint = f"did you mean {near[0]}?" if near else f"the fields are listed in {path}"
                return f"unknown config field {top!r} in {arg}; {hint}"
    return one_line(e) if isinstance(e, flags.Error) else f"{type(e).__name__}: {one_line(e)}"


def define_import_flag() -> flags.FlagHolder:
    """``--import=MODULE`` (repeatable or comma-separated): user modules
    (:mod:`vaekl.user_modules`) that :func:`parse_flags` imports before any other flag is
    parsed, so that a config file and ``--config.FIELD`` overrides see what they register."""
    if user_modules.FLAG in flags.FLAGS:  # a second entry point in one process (tests)
        return flags.FlagHolder(flags.FLAGS, flags.FLAGS[user_modules.FLAG])
    return flags.DEFINE_multi_string(user_modules.FLAG, [], user_modules.FLAG_HELP)


def import_flag_values(argv: Sequence[str]) -> tuple[str, ...]:
    """The module names of every ``--import=M`` / ``--import M`` in ``argv`` (before ``--``)."""
    found: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg.startswith(f"--{user_modules.FLAG}="):
            found.append(arg.split("=", 1)[1])
        elif arg == f"--{user_modules.FLAG}" and i + 1 < len(argv):
            found.append(argv[i + 1])
    return user_modules.names(found)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, failing with one line instead of a traceback or a usage dump.
    With :func:`define_import_flag`, the ``--import`` modules are imported first."""
    if user_modules.FLAG in flags.FLAGS:
        try:
            user_modules.import_all(import_flag_values(argv[1:]))
        except user_modules.UserModuleError as e:
            fail(one_line(e), argv)
    try:
        rest = flags.FLAGS(list(argv))
    except flags.Error as e:
        fail(_explain_flag_error(argv, e) if "config" in str(e) else one_line(e), argv)
    except Exception as e:  # pylint: disable=broad-except  (config files raise anything)
        fail(_explain_flag_error(argv, e), argv)
    for name in list(flags.FLAGS):  # config_flags defers a config file's load error to first use
        flag = flags.FLAGS[name]
        if hasattr(flag, "config_filename") and type(flag.value).__name__ == "_ErrorConfig":
            path = flag.config_filename.split(":", 1)[0]
            fail(f"--{name}: config file {path} not found" if not os.path.isfile(path) else
                 f"--{name}: cannot load {path}: {one_line(getattr(flag.value, '_error', ''))}", argv)
    return rest


def _thread_failure_line(args: threading.ExceptHookArgs) -> None:
    """A library's background thread failed (e.g. an orbax save): one warning line instead of
    its traceback; the main thread reports the consequence as the command's error line."""
    name = args.thread.name if args.thread is not None else "?"
    logging.warning("background thread %s failed: %s", name, one_line(args.exc_value or args.exc_type()))


def _exit_now(code: int) -> NoReturn:
    """Flushes the logs and standard streams, then ``os._exit(code)``: after a failed save,
    orbax's non-daemon signalling threads would otherwise keep the interpreter from exiting
    until their own timeout (minutes), and a launcher or Slurm task waits on it."""
    logging.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(fn: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
    """``absl.app.run(fn)``, with user errors reported as one line and exit status 2; a failed
    or interrupted command exits at once (:func:`_exit_now`). The process keeps the memory it
    frees for the next step (:func:`vaekl.host_memory.keep_freed_memory`)."""
    host_memory.keep_freed_memory()

    def guarded(args: list[str]):
        if not _traceback_wanted(args):
            threading.excepthook = _thread_failure_line
        try:
            return fn(args)
        except USER_ERRORS as e:
            try:
                fail(one_line(e), args)
            except SystemExit as done:
                _exit_now(int(done.code))
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr, flush=True)
            _exit_now(EXIT_INTERRUPTED)
        except Exception:  # a bug: its traceback, then out at once as well
            traceback.print_exc()
            _exit_now(1)

    app.run(guarded, argv=list(argv) if argv is not None else None, flags_parser=parse_flags)


OWN_LOGGERS = ("vaekl", "experiments", "launch")  # loggers (and their children) shown at INFO


def is_own_record(record: pylogging.LogRecord) -> bool:
    """Whether ``record`` comes from this project's loggers (``vaekl.*``, ``experiments.*``,
    ``launch.*``), by logger name: a path test would keep every library's record in a clone
    named ``vaekl`` (its ``.venv`` lies under ``.../vaekl/``)."""
    return record.name.split(".", 1)[0] in OWN_LOGGERS


def quiet_library_logs() -> None:
    """Shows vaekl's INFO lines (progress) on stderr, and only warnings from libraries
    (orbax logs every checkpoint file operation at INFO through absl's logger "absl")."""
    if not (flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present):  # keep --verbosity=1
        logging.set_verbosity(logging.INFO)
    logging.set_stderrthreshold(logging.INFO)
    for name in OWN_LOGGERS:  # named std loggers: INFO, through absl's handler on the root logger
        pylogging.getLogger(name).setLevel(pylogging.INFO)

    def keep(record) -> bool:
        return record.levelno >= pylogging.WARNING or is_own_record(record)

    logging.get_absl_logger().addFilter(keep)
    logging.get_absl_handler().addFilter(keep)  # records of libraries using std logging
