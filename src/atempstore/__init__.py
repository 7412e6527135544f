"""atempstore: asyncio-native temp dirs, file queues, checkpoints, locks and a copy cache.

Every public name is importable from here: ``from atempstore import Lock``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._atomic import open_atomic as open_atomic
from ._cache import CachedFile as CachedFile
from ._cache import FileCache as FileCache
from ._cache import FileInfo as FileInfo
from ._cache import Source as Source
from ._errors import AlreadyLocked as AlreadyLocked
from ._errors import AtempstoreError as AtempstoreError
from ._errors import InvalidNameError as InvalidNameError
from ._errors import LockedStorageError as LockedStorageError
from ._errors import LockException as LockException
from ._errors import LockTimeout as LockTimeout
from ._errors import NoUsableDirectoryError as NoUsableDirectoryError
from ._errors import PathOutsideStoreError as PathOutsideStoreError
from ._errors import SourceChangedError as SourceChangedError
from ._errors import UnsafeDirectoryError as UnsafeDirectoryError
from ._filestore import FileStore as FileStore
from ._filestore import Message as Message
from ._filestore import QueueStatus as QueueStatus
from ._locks import LOCK_EX as LOCK_EX
from ._locks import LOCK_NB as LOCK_NB
from ._locks import LOCK_SH as LOCK_SH
from ._locks import LOCK_UN as LOCK_UN
from ._locks import Lock as Lock
from ._locks import lock as lock
from ._locks import unlock as unlock
from ._session import SessionStorage as SessionStorage
from ._session import SessionStorageRepository as SessionStorageRepository
from ._tempfiles import CleanResult as CleanResult
from ._tempfiles import TempFileManager as TempFileManager
from ._tempfiles import get_manager as get_manager

try:
    __version__ = version("atempstore")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = (
    "LOCK_EX",
    "LOCK_NB",
    "LOCK_SH",
    "LOCK_UN",
    "AlreadyLocked",
    "AtempstoreError",
    "CachedFile",
    "CleanResult",
    "FileCache",
    "FileInfo",
    "FileStore",
    "InvalidNameError",
    "Lock",
    "LockException",
    "LockTimeout",
    "LockedStorageError",
    "Message",
    "NoUsableDirectoryError",
    "PathOutsideStoreError",
    "QueueStatus",
    "SessionStorage",
    "SessionStorageRepository",
    "Source",
    "SourceChangedError",
    "TempFileManager",
    "UnsafeDirectoryError",
    "__version__",
    "get_manager",
    "lock",
    "open_atomic",
    "unlock",
)
