"""Log setup for the server process (uvicorn configures only its own loggers)."""

from __future__ import annotations

import logging


def configure(level: str = "info") -> None:
    """Send the ``server.*`` loggers to stderr in uvicorn's style, once."""
    logger = logging.getLogger("server")
    logger.setLevel(level.upper())
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)-9s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
