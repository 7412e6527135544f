"""Copy-while-serving cache (placeholder: being implemented, issue 5)."""

from __future__ import annotations

from typing import Protocol

__all__ = ("CachedFile", "FileCache", "Source")


class Source(Protocol):
    """A file the cache copies from (being implemented)."""

    key: str


class FileCache:
    """The cache (being implemented)."""


class CachedFile:
    """A reader of a cached file (being implemented)."""
