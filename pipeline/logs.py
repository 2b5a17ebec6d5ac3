"""stderr logging for people (``text``) or for machines (``json``).

``json``: one JSON object a line, made by python-json-logger's ``JsonFormatter``
(https://nhairs.github.io/python-json-logger/), with these keys::

    time     ISO 8601, UTC (2026-11-30T02:00:04.123456+00:00)
    level    DEBUG, INFO, WARNING, ERROR
    logger   the module's logger (pipeline.runner, pipeline.submit, ...)
    message  the line a person would read in ``text`` form
    run_id   the run this process is running, once it has one
    event    a name for machines, on the lines that carry one (run_ended, ...)
    ...      and that line's figures as fields (exit_code, counts, ...)

No log line of tasknotes holds a note's text (the project's rule), in either form.
The format comes from ``--log-format``, else the config's ``logging.format``, else
``text``. Only the command line configures logging: a library call never touches
the host's handlers.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar, Token
from pathlib import Path
from typing import Final, TextIO

import yaml
from pythonjsonlogger.json import JsonFormatter

FORMATS: Final = ("text", "json")
_RUN_ID: ContextVar[str | None] = ContextVar("tasknotes_run_id", default=None)


def set_run_id(run_id: str | None) -> Token[str | None]:
    """Name the run the current context works on: every JSON line logged from it (and from
    tasks and worker threads it starts, which copy the context) carries ``run_id``.
    Returns the token ``reset_run_id`` takes once the run has ended."""
    return _RUN_ID.set(run_id)


def reset_run_id(token: Token[str | None]) -> None:
    """Put back the run id the context had before ``set_run_id`` (a host's later lines
    are not tagged with a run that has ended)."""
    _RUN_ID.reset(token)


class _RunId(logging.Filter):
    """Adds ``run_id`` to a record that has none, when the context knows one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "run_id", None) is None:
            run_id = _RUN_ID.get()
            if run_id is not None:
                record.run_id = run_id
        return True


def json_formatter() -> logging.Formatter:
    """The JSON-lines formatter (keys in the module docstring)."""
    return JsonFormatter("%(levelname)s %(name)s %(message)s", timestamp="time",
                         rename_fields={"levelname": "level", "name": "logger"})


def format_from_config(path: Path | None) -> str | None:
    """``logging.format`` as the YAML at ``path`` sets it, or None (no file, no key, or a
    file the command itself will refuse: its error is the command's to report)."""
    if path is None:
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    section = data.get("logging") if isinstance(data, dict) else None
    value = section.get("format") if isinstance(section, dict) else None
    return value if value in FORMATS else None


class _Handler(logging.StreamHandler[TextIO]):
    """The handler ``configure`` installs (told apart from a host's own)."""


def configure(level: int, log_format: str | None, config_path: Path | None = None, *,
              stream: TextIO | None = None) -> str:
    """Set up the root logger for the ``tasknotes`` command, as ``logging.basicConfig``
    would: one handler on ``stream`` (stderr) at ``level``, in ``log_format``
    (``text``/``json``; None: the config's ``logging.format``, else ``text``), unless
    the root logger already has handlers of its host's. Returns the format chosen. A
    handler an earlier call installed is replaced (tests call ``main`` many times)."""
    chosen = log_format or format_from_config(config_path) or "text"
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _Handler)]
    if len(ours) != len(root.handlers):
        return chosen
    for old in ours:
        root.removeHandler(old)
    root.addHandler(_formatted(_Handler(stream or sys.stderr), chosen))
    root.setLevel(level)
    # psycopg warns of a connection it could not close cleanly ("error ignored terminating
    # <psycopg.Pipeline [BAD] ...>") right after the error that caused it, which tasknotes
    # reports in its own one line: only psycopg's errors are shown.
    logging.getLogger("psycopg").setLevel(max(level, logging.ERROR))
    return chosen


def handler(log_format: str = "json", stream: TextIO | None = None) -> logging.Handler:
    """A handler writing to ``stream`` (default: stderr) in ``log_format`` (``text`` or
    ``json``) as the command does, ``run_id`` included: for a host of the Python API
    to add where it likes (``logging.getLogger("pipeline").addHandler(...)``); nothing
    here installs it. ValueError for another format."""
    if log_format not in FORMATS:
        raise ValueError(f"log_format: one of {', '.join(FORMATS)}, not {log_format!r}")
    return _formatted(logging.StreamHandler(stream or sys.stderr), log_format)


def _formatted(made: logging.StreamHandler[TextIO], log_format: str) -> logging.Handler:
    if log_format == "json":
        made.setFormatter(json_formatter())
    else:
        made.setFormatter(logging.Formatter("tasknotes: %(levelname)s: %(message)s"))
    made.addFilter(_RunId())
    return made


def json_enabled() -> bool:
    """Whether ``configure`` set up JSON lines (then the CLI logs its one-line errors
    as JSON too, so that every stderr line parses)."""
    return any(isinstance(h, _Handler) and isinstance(h.formatter, JsonFormatter)
               for h in logging.getLogger().handlers)


def error_as_json(message: str, exit_code: int) -> bool:
    """Log the command's one-line error (``message``, no traceback) as a JSON line when
    JSON lines are on; False, logging nothing, when they are not (the CLI prints it)."""
    if not json_enabled():
        return False
    logging.getLogger("pipeline").error(message, extra={"event": "error",
                                                        "exit_code": exit_code})
    return True
