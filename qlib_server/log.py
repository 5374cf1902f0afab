"""Logging set-up from the original's ``logging_level`` / ``logging_config`` keys."""

from __future__ import annotations

import logging
import logging.config
import re


class LogFilter(logging.Filter):
    """Drops records whose message matches any of the given regular expressions (the original's)."""

    def __init__(self, param=None):
        super().__init__()
        self.patterns = [re.compile(p) for p in (param or [])]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


def setup_logging(cfg) -> None:
    """Apply ``logging_config`` when given, else a one-line format at ``logging_level``."""
    if cfg.logging_config:
        logging.config.dictConfig(cfg.logging_config)
    else:
        logging.basicConfig(
            level=cfg.logging_level,
            format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
        )
    logging.getLogger("qlib_server").setLevel(cfg.logging_level)
    for noisy in ("pika", "engineio", "socketio", "werkzeug", "geventwebsocket", "redis_lock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
