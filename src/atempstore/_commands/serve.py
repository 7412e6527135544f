"""`atempstore serve [DIR] [--cache CACHE_DIR] [--max-size 1G] [--host H] [--port P] [--demo]`.

Serves the files under DIR over HTTP through a FileCache (see ``_serve/``).
``--demo`` creates a directory of large files (under the system temp dir
unless DIR is given), serves it and exercises it once; ``--exit-after``
stops gracefully after that many seconds, so CI can run the README's command.
``--workers N`` (N > 1) runs N worker processes on one socket
(``_serve/_workers``); each worker is this command again, with the hidden
``--worker-fd`` naming the socket it inherited.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from typing import Any

from .._serve import parse_size

__all__ = ("DESCRIPTION", "HELP", "NAME", "add_arguments", "run")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


#: The subcommand's name, its one-line help and its description.
NAME = "serve"
HELP = "serve DIR over HTTP through the copy-while-serving cache"
DESCRIPTION = (
    "Serve the files under DIR over HTTP (GET, HEAD, Range, ETag, conditional"
    " requests) through a FileCache: the first download of a file copies it into"
    " the cache while it streams; later ones come from the cache."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "directory", metavar="DIR", nargs="?", help="the directory to serve (optional with --demo)"
    )
    parser.add_argument(
        "--cache",
        metavar="CACHE_DIR",
        help="the cache directory (default: ${XDG_CACHE_HOME:-~/.cache}/atempstore/serve;"
        " with --demo and no DIR, one beside the demo files)",
    )
    parser.add_argument(
        "--max-size", type=_size, default="1G", metavar="SIZE", help="cache size (default 1G)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks one)")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="create demo files (in a new directory under the system temp dir, removed at exit,"
        " unless DIR is given), serve them and exercise the server once",
    )
    # The environment default lets CI run the README's command exactly as written
    # and still have it stop on its own.
    exit_after = os.environ.get("ATEMPSTORE_SERVE_EXIT_AFTER")
    parser.add_argument(
        "--exit-after",
        type=_seconds,
        default=_seconds(exit_after) if exit_after else None,
        metavar="SECONDS",
        help="stop gracefully after SECONDS (default: $ATEMPSTORE_SERVE_EXIT_AFTER, else never)",
    )
    parser.add_argument(
        "--grace",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="on stop, how long downloads in progress may finish before they are cut (default 5)",
    )
    parser.add_argument(
        "--header-timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="close a connection that has not sent a complete request head within SECONDS"
        " (default 10; 0: wait forever)",
    )
    parser.add_argument(
        "--workers",
        type=_count,
        default=1,
        metavar="N",
        help="worker processes sharing the listening socket and the cache (default 1)",
    )
    # A worker of --workers: the listening socket it inherited from its parent.
    parser.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a number of workers: {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    """Run ``atempstore serve``; returns the exit status."""
    if args.directory is None and not args.demo:
        print("atempstore serve: pass the directory to serve (or --demo)", file=sys.stderr)
        return 2
    if args.demo and args.workers > 1:
        print("atempstore serve: --demo runs one worker (drop --workers)", file=sys.stderr)
        return 2
    try:
        import starlette  # noqa: F401 - only checking that the extra is installed
        import uvicorn  # noqa: F401
    except ImportError as exc:
        print(
            f"atempstore serve needs Starlette and uvicorn ({exc.name} is missing):"
            " pip install 'atempstore[serve]'",
            file=sys.stderr,
        )
        return 2
    from .._serve import run as serve
    from .._serve import serve_workers, watch_parent

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    access = logging.getLogger("atempstore.serve")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False

    def say(line: str) -> None:
        print(line, flush=True)

    def warn(line: str) -> None:
        print(f"atempstore serve: {line}", file=sys.stderr, flush=True)

    # What one server and a pool of workers are both given.
    common: dict[str, Any] = {
        "cache_dir": args.cache,
        "max_size": args.max_size,
        "host": args.host,
        "port": args.port,
        "exit_after": args.exit_after,
        "grace": args.grace,
        "header_timeout": args.header_timeout,
        "say": say,
    }
    try:
        if args.workers > 1:
            return serve_workers(args.directory, workers=args.workers, warn=warn, **common)
        worker_sock = None
        if args.worker_fd is not None:
            watch_parent()
            worker_sock = socket.socket(fileno=args.worker_fd)
        return asyncio.run(serve(args.directory, demo=args.demo, worker_sock=worker_sock, **common))
    except (OSError, ValueError) as exc:
        print(f"atempstore serve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the server took over the signal
        return 130
    finally:
        access.removeHandler(handler)
