"""Per-process temp directories (placeholder: being implemented, issue 2)."""

from __future__ import annotations

__all__ = ("CleanResult", "TempFileManager", "get_manager")


class CleanResult:
    """What `TempFileManager.clean_userdir` removed and skipped."""


class TempFileManager:
    """Per-process temp directory manager (being implemented)."""


async def get_manager() -> TempFileManager:
    """The process-wide default manager (being implemented)."""
    raise NotImplementedError
