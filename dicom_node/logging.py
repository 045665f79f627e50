"""Structured logs: one JSON object per line on stderr.

``log_event(logger, "series_complete", series_uid=..., n=...)`` attaches fields; the
formatter writes ``{"ts", "level", "logger", "event", ...fields}``.

``with log_context(series_uid=...)`` adds fields to every record logged in that block on
this thread (also ``log.exception`` and third-party loggers), so a job's or a push's lines
all carry the series UID even where the call site does not pass it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["JsonFormatter", "configure_logging", "log_context", "log_event"]

# Per thread (each thread starts with an empty context): fields for every record.
_CONTEXT: contextvars.ContextVar[tuple[tuple[str, Any], ...]] = contextvars.ContextVar(
    "synthmr_log_context", default=()
)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Attach ``fields`` (e.g. ``series_uid``) to every record logged inside the block."""
    token = _CONTEXT.set(tuple({**dict(_CONTEXT.get()), **fields}.items()))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


_STD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line; extra record attributes become fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        out.update(dict(_CONTEXT.get()))  # explicit record fields below win over the context
        for k, v in vars(record).items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    """Route the root logger to stderr (JSON lines unless ``json_lines`` is False)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # pynetdicom logs every PDU and highdicom every copied module at INFO: warnings only.
    for noisy in ("pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``event`` with structured ``fields`` (they must not shadow LogRecord attributes)."""
    logger.log(
        level, event, extra={k if k not in _STD_ATTRS else f"f_{k}": v for k, v in fields.items()}
    )
