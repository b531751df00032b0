"""``python -m server [--host H] [--port P]``: run uvicorn with settings from ``LLM_*``."""

from __future__ import annotations

import argparse
import sys

import uvicorn

from server import logs
from server.factory import create_app
from server.settings import SettingsError, from_env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    try:
        settings = from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    config = uvicorn.Config(create_app(settings), host=args.host, port=args.port,
                            log_level=args.log_level)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
