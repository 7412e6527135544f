"""Maildir file store and work queue (placeholder: being implemented, issue 4)."""

from __future__ import annotations

__all__ = ("FileStore", "Message")


class FileStore:
    """Maildir store (being implemented)."""


class Message:
    """A claimed message (being implemented)."""
