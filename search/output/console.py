"""What reaches the console of `python -m search.run`, and where the rest goes.

By default a person reads the search's own lines (search/output/trial_lines.py) and the result;
`--quiet` leaves the result and errors; `--verbose` leaves everything as the libraries print
it (Ray Tune's tables included). Except with `--verbose`, what Ray, Optuna, `datasets`,
transformers and the Hugging Face hub log goes to a file per source in the run's `logs/`
(`ray.log`, `optuna.log`, ...), the rest of the driver's logging and Python's warnings to
`driver.log`, and no library draws progress bars.

The console is the process's, as logging is: the CLI sets it once (`use_console`), and Tune's
callbacks ask it whether to print (`say`) when they print, also once Tune has pickled them into
an experiment and a resume has unpickled them.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

from search import environment


class Console(Enum):
    QUIET = "quiet"      # the result and errors only
    DEFAULT = "default"  # one line per trial event, a status line, the result
    VERBOSE = "verbose"  # every library's own output, Ray Tune's tables included


# Each of these logs through a console handler of its own, added once, when it is first imported.
# Ray and MLflow are too, diverted later (`divert_logs`).
LIBRARIES = ("optuna", "datasets", "transformers", "huggingface_hub")
DRIVER_LOG = "driver.log"  # the root logger's: every other logger of the driver, and Python's warnings
_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


class HeldLog(logging.Handler):
    """One source's log records: held in memory until `open` names the run's log directory
    (the driver logs before the run directory exists: the model check, the tokenizing),
    then appended to the file `filename` there."""

    def __init__(self, filename: str) -> None:
        super().__init__()
        self.filename = filename
        self.setFormatter(_FORMAT)
        self._held: list[logging.LogRecord] = []
        self._file: logging.FileHandler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is None:
            self._held.append(record)
        else:
            self._file.emit(record)

    def open(self, directory: Path) -> None:
        with self.lock:
            # delay: the file is made at its first record, so a source that logged nothing leaves none
            self._file = logging.FileHandler(directory / self.filename, encoding="utf-8", delay=True)
            self._file.setFormatter(self.formatter)
            for record in self._held:
                self._file.emit(record)
            self._held.clear()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


class _ProcessConsole:
    """The console of this process: its mode, when it started, and the log handlers it installed."""

    def __init__(self) -> None:
        self.mode = Console.DEFAULT
        self.started = time.monotonic()
        self.logs: dict[logging.Logger, HeldLog] = {}
        self.log_dir: Path | None = None


_console = _ProcessConsole()


def use_console(mode: Console) -> None:
    """From now on, show `mode` on this process's console. Except with VERBOSE, the libraries'
    logs are diverted (held until `keep_logs_in` is called) and their progress bars are off.
    Imports the LIBRARIES (about 2 s, as a run does anyway)."""
    _console.mode, _console.started, _console.log_dir = mode, time.monotonic(), None
    if mode is Console.VERBOSE:
        return
    environment.setenvs(environment.TUNE_PLAIN_OUTPUT)
    for name in LIBRARIES:
        importlib.import_module(name)
        _divert(logging.getLogger(name), f"{name}.log")
    _divert(logging.getLogger(), DRIVER_LOG)
    logging.captureWarnings(True)
    import datasets
    import huggingface_hub.utils
    import transformers.utils.logging

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _divert(logger: logging.Logger, filename: str) -> None:
    """Send what `logger` logs to `filename` instead of the console: a library's console
    handlers go, and so does an earlier call's handler. The root logger has no console handler
    of its own (Python prints through a last resort when no handler takes a record), and keeps
    any that another tool added to it."""
    root = logger is logging.getLogger()
    for handler in list(logger.handlers):
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if isinstance(handler, HeldLog) or (console and not root):
            logger.removeHandler(handler)
            handler.close()
    held = HeldLog(filename)
    if _console.log_dir is not None:
        held.open(_console.log_dir)
    logger.addHandler(held)
    if not root:
        logger.propagate = False  # nor through the root's handlers: a library's records go to its own file
    _console.logs[logger] = held


def keep_logs_in(directory: Path) -> None:
    """Write the diverted logs, those held so far and what follows, to a file per source in
    `directory` (made if missing). Nothing to do with the VERBOSE console."""
    if not _diverting():
        return
    directory.mkdir(parents=True, exist_ok=True)
    _console.log_dir = directory
    for held in _console.logs.values():
        held.open(directory)
    say(f"what Ray, Optuna, datasets and transformers log goes to {directory}/ (--verbose shows it here)")


def divert_logs(library: str) -> None:
    """Divert `library`'s logs as `use_console` did the LIBRARIES' (nothing to do with the
    VERBOSE console, or before `use_console`), to `<library>.log`, importing it: for a library
    imported later than the others. Ray gets its console handler when it is first imported, which
    must wait until the run has set Ray's network settings (search/cluster/connect.py), so Ray is
    diverted just before it starts; MLflow, an optional tracker, when the run first asks its store."""
    if not _diverting():
        return
    importlib.import_module(library)  # its console handler is added on import, and removed below
    _divert(logging.getLogger(library), f"{library}.log")


RAY_CORE_LOG = "ray_core.log"  # what Ray's C++ core writes to the driver's stderr, which no Python logger sees


@contextmanager
def ray_core_output_in_logs():
    """While Ray runs in this process (inside this block): what its C++ core writes to the
    process's stderr (its core worker's warnings and errors, such as one for every W&B logging
    actor) goes to RAY_CORE_LOG in the run's logs/, while what Python prints to sys.stderr still
    reaches the console; and the error messages Ray's driver would print are not printed. Nothing
    to do with the VERBOSE console, or before `keep_logs_in`."""
    directory = _console.log_dir
    if not _diverting() or directory is None:
        yield
        return
    from search.cluster.ray_contract import error_messages_off_the_console
    python_stderr = sys.stderr
    python_stderr.flush()
    console = os.dup(2)
    log = os.open(directory / RAY_CORE_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    os.close(log)
    if _writes_to(python_stderr, 2):  # not where a test captured it: keep Python's lines on the console
        sys.stderr = open(console, "w", buffering=1, closefd=False, encoding=python_stderr.encoding,
                          errors=python_stderr.errors)
    try:
        with error_messages_off_the_console():  # Ray's "(raylet) ..." lines, which it prints to sys.stdout
            yield
    finally:
        sys.stderr.flush()
        if sys.stderr is not python_stderr:
            sys.stderr.close()
            sys.stderr = python_stderr
        os.dup2(console, 2)
        os.close(console)


def _writes_to(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # a stream in memory has no file descriptor
        return False


def _diverting() -> bool:
    return _console.mode is not Console.VERBOSE and bool(_console.logs)


def say(line: str, quiet_too: bool = False) -> None:
    """Print `line` after the run's clock, as the console asks: by default, and with --quiet
    where `quiet_too`; never with --verbose, where Tune's own display stands instead."""
    mode = _console.mode
    if mode is Console.DEFAULT or (mode is Console.QUIET and quiet_too):
        print(f"[{clock(time.monotonic() - _console.started)}] {line}", flush=True)


def clock(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour on."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
