"""The web layer (SPEC §8): what an async web handler returns to serve a cached file.

Needs the ``serve`` extra (``pip install 'atempstore[serve]'``: Starlette and
uvicorn); ``import atempstore`` never imports this module.

* `CachedFileResponse`: a Starlette `Response` (so FastAPI and Starlette
  handlers return it as it is) that serves a path or a `Source` through a
  `FileCache`, with ranges (one, or several as ``multipart/byteranges``),
  ``If-Range``, 304 / 412, ``HEAD`` without starting a copy, and
  ``Content-Disposition``;
* `create_app`: the ASGI app of ``atempstore serve``, mountable in a user's
  app (``app.mount("/files", create_app("/srv/files", cache_dir=...))``).

Example:
    ```python
    from starlette.applications import Starlette
    from starlette.routing import Route
    from atempstore import FileCache
    from atempstore.web import CachedFileResponse

    cache = FileCache("/var/cache/media", max_size=20 * 2**30)

    async def download(request):
        name = request.path_params["name"]
        return CachedFileResponse(cache, f"/mnt/nfs/{name}", filename=name)

    app = Starlette(routes=[Route("/d/{name}", download)])
    ```
"""

from __future__ import annotations

try:
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "atempstore.web needs the serve extra: pip install 'atempstore[serve]'"
    ) from exc

from ._serve import CachedFileResponse as CachedFileResponse
from ._serve import create_app as create_app

__all__ = ("CachedFileResponse", "create_app")
