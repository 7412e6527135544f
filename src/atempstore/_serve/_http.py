"""HTTP semantics for serving one file, as plain functions: no loop, no server.

Everything here is a decision made from a request's method and headers and a
file's size, mtime and ETag: the validators (ETag, Last-Modified), the
conditional requests of RFC 9110 13.2.2 (304 / 412), ``Range`` (one range, or
several as ``multipart/byteranges``) and ``If-Range`` (206 / 416), the media
type, ``Content-Disposition``, and the status an `OSError` maps to.  They are
apart from the app so that they can be tested on their own, and so that
`CachedFileResponse` (``_response``, what a user's handler returns) and
``atempstore serve`` answer with exactly the same rules: each calls `answer`
with what it knows of its file and sends what that says.

Request headers are Starlette's `Headers` (case-insensitive, repeated fields
kept); this module only reads them, so it imports Starlette for type checking
only and works without the ``serve`` extra (``parse_size`` is used by the
command line before the extra is checked).
"""

from __future__ import annotations

import email.utils
import errno
import mimetypes
import re
import secrets
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.datastructures import Headers

__all__ = (
    "MAX_RANGES",
    "Answer",
    "Part",
    "Unsatisfiable",
    "answer",
    "content_disposition",
    "error_status",
    "etag",
    "http_date",
    "media_type",
    "parse_range",
    "parse_ranges",
    "parse_size",
)

#: More ranges than this in one request are answered with the whole file
#: (a request for thousands of tiny ranges costs the server, not the client).
MAX_RANGES = 100


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", re.ASCII)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``"1G"`` -> 1073741824.  Units are binary (K, M, G, T; ``KiB``/``KB`` alike)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (use a number of bytes or e.g. 512M, 1G, 1.5GiB)")
    size = int(float(match[1]) * _UNITS[match[2].lower()])
    if size <= 0:
        raise ValueError(f"the size must be > 0, got {text!r}")
    return size


def media_type(name: str) -> str:
    """The ``Content-Type`` for a file name (call it in a worker thread)."""
    # mimetypes reads /etc/mime.types on first use: a file read, so never on the loop.
    guessed = mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"
    if guessed.startswith("text/"):
        guessed += "; charset=utf-8"
    return guessed


def etag(size: int, mtime_ns: int) -> str:
    """A strong validator from size and mtime alone, for a version that has no
    identity of its own (a `Source` object); a local file's ETag also carries
    its identity (`FileInfo.etag`)."""
    return f'"{size:x}-{mtime_ns:x}"'


def content_disposition(kind: str, filename: str) -> str:
    """``attachment; filename="x"``, with an RFC 5987 ``filename*`` for a name not in ASCII.

    The plain ``filename`` is an ASCII stand-in for old clients (each other
    character an ``_``); ``filename*`` carries the name as UTF-8.
    """
    ascii_ = "".join(c if 32 <= ord(c) < 127 else "_" for c in filename)
    plain = ascii_.replace("\\", "\\\\").replace('"', '\\"')
    value = f'{kind}; filename="{plain}"'
    if ascii_ != filename:
        encoded = urllib.parse.quote(filename.encode("utf-8", "surrogateescape"), safe="")
        value += f"; filename*=UTF-8''{encoded}"
    return value


def http_date(seconds: int) -> str:
    """``Last-Modified`` form of a time in seconds since the epoch."""
    return email.utils.formatdate(seconds, usegmt=True)


def error_status(exc: OSError) -> tuple[int, str]:
    """The status and reason an error reading the served tree answers with."""
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return 404, "not found"
    if isinstance(exc, PermissionError):
        return 403, "permission denied"
    if exc.errno == errno.ELOOP:
        return 403, "a symlink appeared in the path"
    if exc.errno == errno.ENAMETOOLONG:
        return 414, "name too long"
    return 500, f"cannot read it: {exc.strerror or exc}"


class Unsatisfiable(Exception):
    """The Range lies wholly past the end of the file: 416."""


_SPEC = re.compile(r"\s*([0-9]*)\s*-\s*([0-9]*)\s*", re.ASCII)
_UNIT = re.compile(r"\s*bytes\s*=", re.ASCII | re.IGNORECASE)


def parse_ranges(value: str | None, size: int) -> list[tuple[int, int]] | None:
    """The ``[start, stop)`` spans a ``Range`` asks for, sorted, overlapping and
    adjacent ones merged; None to send the whole file.

    None for no header, a malformed one (RFC 9110 14.2: ignored) and one of
    more than `MAX_RANGES` ranges.  Ranges wholly past the end are dropped;
    if none is left, `Unsatisfiable` (416).

    Example:
        ```python
        parse_ranges("bytes=0-9,5-19,-5", 100)  # [(0, 20), (95, 100)]
        ```
    """
    if not value:
        return None
    unit = _UNIT.match(value)
    if unit is None:
        return None
    specs = [part for part in value[unit.end() :].split(",") if part.strip()]
    if not specs or len(specs) > MAX_RANGES:
        return None
    spans: list[tuple[int, int]] = []
    for spec in specs:
        match = _SPEC.fullmatch(spec)
        if match is None:
            return None
        first, last = match[1], match[2]
        if not first:
            if not last:
                return None
            suffix = int(last)
            if suffix and size:
                spans.append((max(0, size - suffix), size))
            continue
        start = int(first)
        if last and int(last) < start:
            return None  # "bytes=9-3" makes the whole header invalid
        if start < size:
            spans.append((start, size if not last else min(int(last) + 1, size)))
    if not spans:
        raise Unsatisfiable
    spans.sort()
    merged = [spans[0]]
    for start, stop in spans[1:]:
        if start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """``(start, stop)`` (stop exclusive) for a header that asks for one span,
    else None (no header, a malformed one, or several spans: `parse_ranges`
    answers those).  A range that starts at or past the end raises `Unsatisfiable`.
    """
    spans = parse_ranges(value, size)
    return spans[0] if spans is not None and len(spans) == 1 else None


def _field(headers: Headers, name: str) -> str | None:
    values = headers.getlist(name)
    # Repeated fields combine into one comma-separated list (RFC 9110 5.3).
    return ", ".join(values) if values else None


_TAG = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')


def _tags(value: str) -> tuple[bool, list[tuple[bool, str]]]:
    """(is "*", [(weak, opaque-tag)]) of an If-Match / If-None-Match value."""
    if value.strip() == "*":
        return True, []
    return False, [(bool(m[1]), m[2]) for m in _TAG.finditer(value)]


def _date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None  # an invalid date is ignored (RFC 9110 13.1.3)
    return parsed.timestamp() if parsed.tzinfo is not None else None


def _preconditions(method: str, headers: Headers, tag: str, mtime: int) -> int | None:
    """RFC 9110 13.2.2, in its order: 412, 304, or None to go on.  ``mtime`` in seconds."""
    if_match = _field(headers, "if-match")
    if if_match is not None:
        star, tags = _tags(if_match)
        if not star and not any(not weak and other == tag for weak, other in tags):
            return 412
    else:
        since = _date(_field(headers, "if-unmodified-since"))
        if since is not None and mtime > since:
            return 412
    if_none_match = _field(headers, "if-none-match")
    if if_none_match is not None:
        star, tags = _tags(if_none_match)
        # Weak comparison: W/"x" matches "x".
        if star or any(other == tag for _, other in tags):
            return 304 if method in ("GET", "HEAD") else 412
    elif method in ("GET", "HEAD"):
        since = _date(_field(headers, "if-modified-since"))
        if since is not None and mtime <= since:
            return 304
    return None


def _range_applies(headers: Headers, tag: str, mtime: int) -> bool:
    """If-Range: the range only if the client's copy is still current."""
    if_range = _field(headers, "if-range")
    if if_range is None:
        return True
    if_range = if_range.strip()
    if if_range.startswith(('"', "W/")):
        return if_range == tag  # strong comparison only
    return _date(if_range) == mtime


@dataclass(frozen=True)
class Part:
    """One part of a ``multipart/byteranges`` body: its head, then ``[start, stop)``."""

    head: bytes
    start: int
    stop: int


@dataclass(frozen=True)
class Answer:
    """What to send for a request of one file version.

    ``span`` is the ``[start, stop)`` of the file to send as the body, None
    for no bytes of the file (HEAD, 304, an error, a multipart body).
    ``parts`` and ``epilogue`` are a ``multipart/byteranges`` body: each
    part's head then its bytes of the file, then the epilogue (empty for
    HEAD, which gets the headers only).  ``reason`` is set for an error
    answer (412, 416): its body is that reason as plain text.
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    span: tuple[int, int] | None = None
    reason: str = ""
    parts: tuple[Part, ...] = ()
    epilogue: bytes = b""


def answer(
    method: str,
    headers: Headers,
    *,
    size: int,
    mtime_ns: int,
    media: str,
    tag: str | None = None,
    extra: tuple[tuple[str, str], ...] = (),
) -> Answer:
    """The answer to ``method`` with request ``headers`` for a file of ``size`` bytes.

    ``media`` is its `media_type`, ``tag`` its ETag (`etag` of size and
    mtime unless given).  The status is 304 or 412 when a precondition
    decides, 416 for a range past the end (unless ``If-Range`` says the
    client's copy is stale), 206 for one satisfiable range or, for several, a
    206 ``multipart/byteranges`` (`parse_ranges`), else 200.  ``extra`` fields
    (``Content-Disposition``...) go with a 200 or 206.
    """
    tag = tag or etag(size, mtime_ns)
    mtime = mtime_ns // 1_000_000_000
    validators = (("etag", tag), ("last-modified", http_date(mtime)))
    verdict = _preconditions(method, headers, tag, mtime)
    if verdict == 304:
        return Answer(304, validators)
    if verdict == 412:
        return Answer(412, (), reason="precondition failed")
    value = _field(headers, "range")
    spans: list[tuple[int, int]] | None
    try:
        spans = parse_ranges(value, size)
    except Unsatisfiable:
        spans = None
        if _range_applies(headers, tag, mtime):
            return Answer(
                416, (("content-range", f"bytes */{size}"),), reason="range not satisfiable"
            )
    if spans is not None and not _range_applies(headers, tag, mtime):
        spans = None
    if spans is not None and len(spans) > 1:
        return _multipart(method, size, media, spans, (*validators, *extra))
    start, stop = spans[0] if spans is not None else (0, size)
    fields = [
        ("content-type", media),
        ("content-length", str(stop - start)),
        ("accept-ranges", "bytes"),
        *validators,
        *extra,
    ]
    if spans is not None:
        fields.append(("content-range", f"bytes {start}-{stop - 1}/{size}"))
    body = (start, stop) if method != "HEAD" and start < stop else None
    return Answer(206 if spans is not None else 200, tuple(fields), body)


def _multipart(
    method: str,
    size: int,
    media: str,
    spans: list[tuple[int, int]],
    fields: tuple[tuple[str, str], ...],
) -> Answer:
    """A 206 ``multipart/byteranges`` of ``spans`` (RFC 9110 14.6)."""
    boundary = secrets.token_hex(12)
    parts = tuple(
        Part(
            (
                ("\r\n" if i else "") + f"--{boundary}\r\ncontent-type: {media}\r\n"
                f"content-range: bytes {start}-{stop - 1}/{size}\r\n\r\n"
            ).encode("latin-1"),
            start,
            stop,
        )
        for i, (start, stop) in enumerate(spans)
    )
    epilogue = f"\r\n--{boundary}--\r\n".encode("latin-1")
    length = sum(len(p.head) + p.stop - p.start for p in parts) + len(epilogue)
    head = (
        ("content-type", f"multipart/byteranges; boundary={boundary}"),
        ("content-length", str(length)),
        ("accept-ranges", "bytes"),
        *fields,
    )
    if method == "HEAD":
        return Answer(206, head)
    return Answer(206, head, parts=parts, epilogue=epilogue)
