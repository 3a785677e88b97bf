"""Log lines in tritonserver's format, and what ``--log-*`` change.

Triton writes ``I1205 08:37:55.323876 21185 file.cc:123] message`` (``--log-format default``) or
``2026-12-05T08:40:29Z I 21185 file.cc:123] message`` (``ISO8601``), both in UTC; log collectors
set up for Triton parse these. The front's records and every worker's lines (the backends' and
``pb_utils.Logger``'s) use :func:`prefix`, so the whole server reads as one log.

Workers read the settings as environment variables (:data:`FORMAT_ENV`, :data:`LEVELS_ENV`,
:data:`VERBOSE_ENV`): they start with the front's environment, set by :func:`configure` before any
worker starts, and when the logging extension changes them, each running worker is sent
:func:`worker_env` (kernel.server.Core.log_settings_changed).
``--log-file`` puts the file on the front's descriptors 1 and 2: workers inherit them, so their
lines, the model table and any traceback land in the file too, as everything Triton logs does.
"""

from __future__ import annotations

import logging
import os
import sys
import time

#: ``default`` or ``ISO8601`` (``--log-format``)
FORMAT_ENV = "EDGE_KERNEL_LOG_FORMAT"
#: the letters of the enabled levels among I, W, E (``--log-info``, ``--log-warning``, ``--log-error``)
LEVELS_ENV = "EDGE_KERNEL_LOG_LEVELS"
#: ``1`` when verbose lines are on (``--log-verbose`` > 0): the python backend's ``Logger.log_verbose``
VERBOSE_ENV = "EDGE_KERNEL_LOG_VERBOSE"
FORMATS = ("default", "ISO8601")


def prefix(level: str, where: str, now: float | None = None, fmt: str | None = None) -> str:
    """The head of a log line, up to and including ``"] "``: ``level`` is I, W or E, ``where`` what
    Triton puts as ``file:line`` (a logger's name, or a model file and line)."""
    now = time.time() if now is None else now
    fmt = fmt or os.environ.get(FORMAT_ENV, "default")
    utc = time.gmtime(now)
    if fmt == "ISO8601":
        return f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', utc)} {level} {os.getpid()} {where}] "
    return f"{level}{time.strftime('%m%d %H:%M:%S', utc)}.{int(now % 1 * 1e6):06d} {os.getpid()} {where}] "


def enabled(level: str) -> bool:
    """Whether lines of ``level`` (I, W or E) are logged; verbose lines are tagged I but follow
    ``--log-verbose`` alone, as in Triton."""
    return level in os.environ.get(LEVELS_ENV, "IWE")


class TritonFormatter(logging.Formatter):
    """Records as Triton's lines; DEBUG (``--log-verbose``) is tagged I, as Triton tags verbose lines."""

    def format(self, record: logging.LogRecord) -> str:
        level = "I" if record.levelno < logging.WARNING else "W" if record.levelno < logging.ERROR else "E"
        text = prefix(level, record.name, record.created) + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _LevelFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:
            return True  # verbose: the logger's level decides
        return enabled("I" if record.levelno < logging.WARNING else "W" if record.levelno < logging.ERROR else "E")


def open_log_file(path: str) -> str:
    """Send descriptors 1 and 2 (this process's and its future workers') to ``path``, appended to;
    the error's text if it cannot be opened (the log stays where it was, as Triton's does)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
        return f"failed to open log file '{path}': {e.strerror}"
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return ""


def configure(verbose: int = 0, info: bool = True, warning: bool = True, error: bool = True,
              fmt: str = "default", file: str = "") -> None:
    """Set up the front's logging (and, through the environment, the workers') as the ``--log-*`` flags
    ask; call it before any worker starts."""
    os.environ[FORMAT_ENV] = fmt
    os.environ[LEVELS_ENV] = "I" * info + "W" * warning + "E" * error
    problem = open_log_file(file) if file else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TritonFormatter())
    handler.addFilter(_LevelFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if problem:
        logging.getLogger("kernel").warning("%s; logging to the console", problem)


#: What a logging-settings request may change, in the order Triton applies them: each is applied before the
#: next is looked at, so a request refused at ``log_format`` keeps its ``log_info`` (observed on 2.51).
SETTINGS = ("log_file", "log_info", "log_warning", "log_error", "log_verbose_level", "log_format")
LOG_FILE_FIXED = "log file location can not be updated through network protocol"
_LEVEL_OF = {"log_info": "I", "log_warning": "W", "log_error": "E"}


def settings(verbose: int) -> dict[str, bool | int | str]:
    """The settings as Triton's logging extension reports them (``log_file`` is never reported)."""
    levels = os.environ.get(LEVELS_ENV, "IWE")
    return {"log_file": "", "log_info": "I" in levels, "log_warning": "W" in levels, "log_error": "E" in levels,
            "log_verbose_level": verbose, "log_format": os.environ.get(FORMAT_ENV, "default")}


def verbose() -> bool:
    """Whether verbose lines are logged (a worker's: the python backend's ``Logger.log_verbose``)."""
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0")


def worker_env() -> dict[str, str]:
    """The settings as the workers read them: what a running worker is sent when they change (workers
    started later inherit them from the front's environment)."""
    return {key: os.environ[key] for key in (FORMAT_ENV, LEVELS_ENV, VERBOSE_ENV) if key in os.environ}


def set_level(key: str, on: bool) -> None:
    """``log_info``, ``log_warning`` or ``log_error`` at run time (the front's lines; the workers' once the
    caller has sent them :func:`worker_env`)."""
    letter = _LEVEL_OF[key]
    levels = os.environ.get(LEVELS_ENV, "IWE").replace(letter, "")
    os.environ[LEVELS_ENV] = "".join(c for c in "IWE" if c in levels or (c == letter and on))


def set_format(fmt: str) -> None:
    """``log_format`` at run time: one of :data:`FORMATS` (Triton's spelling only; the caller checks)."""
    os.environ[FORMAT_ENV] = fmt


def set_verbose(level: int) -> None:
    """``log_verbose_level`` at run time: the front's verbose records on or off (and the workers', as
    :func:`set_level`)."""
    logging.getLogger().setLevel(logging.DEBUG if level else logging.INFO)
    os.environ[VERBOSE_ENV] = "1" if level else "0"


__all__ = ["FORMATS", "FORMAT_ENV", "LEVELS_ENV", "LOG_FILE_FIXED", "SETTINGS", "TritonFormatter", "VERBOSE_ENV",
           "configure", "enabled", "open_log_file", "prefix", "set_format", "set_level", "set_verbose", "settings",
           "verbose", "worker_env"]
