"""Where library output goes: the terminal carries the project's lines, libraries write to a log file.

Ray, Optuna, MLflow and their helpers log through Python's ``logging`` with handlers of their own
(Ray's token-auth WARNING on every start, Tune's "Resume experiment with: Tuner.restore(...)" after
Ctrl-C — wrong advice for a CLI user —, Optuna's "A new study created", MLflow's database set-up).
:func:`capture` takes those handlers away and sends every library record to one handler on the root
logger, which keeps the records in memory until the command knows its sweep folder
(:func:`write_to`: ``<storage>/<name>/sweeper.log``) and echoes them to stderr under ``--verbose``.
Records of a command that never names a folder go to ``~/.cache/sweeper/logs/sweeper.log``.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from pathlib import Path

LIBRARIES = (
    "ray",
    "optuna",
    "mlflow",
    "alembic",
    "urllib3",
    "filelock",
    "huey",
    "uvicorn",
    "matplotlib",
    "py.warnings",
    "gpytorch",
    "pyarrow",
    "fsspec",
    "asyncio",
)
FALLBACK = Path("~/.cache/sweeper/logs/sweeper.log")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MAX_KEPT = 10_000  # records kept in memory before the log file is named (a sweep names it within seconds)


class LibraryLog(logging.Handler):
    """Keeps library records until a file is named, then appends them there; echoes under verbose."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(_FORMAT))
        self.buffer: list[str] = []  # until a file is named; bounded (MAX_KEPT) so a long command cannot grow it
        self.path: Path | None = None
        self.verbose = False

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("sweeper"):  # the project's own loggers print to the terminal (_project)
            return
        try:
            line = self.format(record)
        except Exception:  # a library's malformed record must not break the command
            return
        if self.verbose:
            print(line, file=sys.stderr, flush=True)
        if self.path is None:
            if len(self.buffer) < MAX_KEPT:
                self.buffer.append(line)
            return
        self._append([line])

    def _append(self, lines: list[str]) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(ln + "\n" for ln in lines))
        except OSError:  # a log that cannot be written is not worth failing a sweep for
            pass


_HANDLER: LibraryLog | None = None


def capture(verbose: bool = False) -> LibraryLog:
    """Route every library logger to the one :class:`LibraryLog` (idempotent; ``verbose`` only turns on)."""
    global _HANDLER
    if _HANDLER is None:
        _HANDLER = LibraryLog()
        root = logging.getLogger()
        root.addHandler(_HANDLER)
        root.setLevel(min(root.level or logging.WARNING, logging.INFO))
        _project()
        logging.captureWarnings(True)  # warnings.warn from libraries: to the log, not the terminal
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # MLflow adds no stderr handler at import
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in `report`
        atexit.register(_flush_fallback)
    _HANDLER.verbose = _HANDLER.verbose or verbose
    route()
    return _HANDLER


def route() -> None:
    """Strip the handlers a library installed when imported (Ray, Optuna do) and let it propagate to ours.

    Call after importing such a library: Ray adds a stderr handler to ``ray`` at import and Optuna one
    to ``optuna``.
    """
    if _HANDLER is None:
        return
    for name in LIBRARIES:
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    if "optuna" in sys.modules:
        sys.modules["optuna"].logging.disable_default_handler()


def verbose() -> bool:
    """Whether library output is echoed to the terminal (``--verbose``)."""
    return bool(_HANDLER and _HANDLER.verbose)


def write_to(path: str | Path) -> Path | None:
    """Append library records, those kept so far first, to ``path`` (a sweep's ``sweeper.log``)."""
    if _HANDLER is None:
        return None
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    _HANDLER.path = path
    kept, _HANDLER.buffer = _HANDLER.buffer, []
    if kept:
        _HANDLER._append(kept)
    return path


def log_path() -> Path | None:
    """The file library records go to, once named."""
    return _HANDLER.path if _HANDLER else None


def _project() -> None:
    """The project's own loggers (``sweeper.*``) write to stderr: they are the project's lines."""
    lg = logging.getLogger("sweeper")
    if not any(getattr(h, "_sweeper", False) for h in lg.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("sweeper: %(message)s"))
        h._sweeper = True
        lg.addHandler(h)
        lg.setLevel(logging.WARNING)


def _flush_fallback() -> None:
    if _HANDLER is not None and _HANDLER.path is None and _HANDLER.buffer:
        write_to(FALLBACK.expanduser())
