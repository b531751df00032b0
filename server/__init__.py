"""OpenAI-compatible LLM server. ``uvicorn server:app`` serves the app built from ``LLM_*``.

``app`` is built on first access (module ``__getattr__``), so ``import server`` needs no
environment; with no ``LLM_ENGINE`` set the sim engine is used.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from server import logs
from server.factory import create_app
from server.settings import Settings, SettingsError, from_env

if TYPE_CHECKING:
    from fastapi import FastAPI

    app: FastAPI

__all__ = ["Settings", "SettingsError", "app", "create_app", "from_env"]

_app: Any = None


def __getattr__(name: str) -> Any:
    global _app
    if name == "app":
        if _app is None:
            try:
                settings = from_env()
            except SettingsError as exc:
                # `uvicorn server:app` would print a traceback; one line naming the variable
                # is what an operator needs.
                print(f"error: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            logs.configure(settings.log_level)
            _app = create_app(settings)
        return _app
    raise AttributeError(f"module 'server' has no attribute {name!r}")
