"""Crash-safe checkpoints (placeholder: being implemented, issue 3)."""

from __future__ import annotations

__all__ = ("SessionStorage", "SessionStorageRepository")


class SessionStorage:
    """Checkpoint storage (being implemented)."""


class SessionStorageRepository:
    """A directory of session storages (being implemented)."""
