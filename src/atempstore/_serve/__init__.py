"""`atempstore serve`: the files under a directory over HTTP, through a `FileCache`.

One concern per module, each importing only the ones above it:

* ``_http``: HTTP semantics as plain functions (sizes, ranges, validators,
  preconditions, the answer for one file version);
* ``_locate``: what a request path names, confined to the served directory
  (blocking: run in a worker thread);
* ``_app``: the Starlette app (`create_app`) and its per-request log line;
* ``_server``: `FileServer`, the uvicorn lifecycle and graceful stop;
* ``_demo``: ``--demo``, its files and its one pass of clients;
* ``_workers``: ``--workers N``, N processes on one listening socket;
* ``_run``: the command's whole run (`run`).

Starlette and uvicorn are optional (the ``serve`` extra).  The names that
need them (`create_app`, `FileServer`, `run`) are loaded on first use, so
the command line can parse ``--max-size`` with `parse_size`, and say what
to install, without the extra.  ``atempstore`` itself never imports this
package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._http import Unsatisfiable as Unsatisfiable
from ._http import parse_range as parse_range
from ._http import parse_size as parse_size
from ._locate import default_cache_dir as default_cache_dir

if TYPE_CHECKING:
    from ._app import create_app as create_app
    from ._response import CachedFileResponse as CachedFileResponse
    from ._run import run as run
    from ._server import FileServer as FileServer
    from ._workers import serve_workers as serve_workers
    from ._workers import watch_parent as watch_parent

__all__ = (
    "CachedFileResponse",
    "FileServer",
    "Unsatisfiable",
    "create_app",
    "default_cache_dir",
    "parse_range",
    "parse_size",
    "run",
    "serve_workers",
    "watch_parent",
)

_LAZY = {
    "CachedFileResponse": "._response",
    "FileServer": "._server",
    "create_app": "._app",
    "run": "._run",
    "serve_workers": "._workers",
    "watch_parent": "._workers",
}


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # found once; later lookups skip this function
    return value
