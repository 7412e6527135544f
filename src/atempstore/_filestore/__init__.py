"""FileStore: the maildir store of gocept.filestore, grown into a multi-process work queue.

Layout, shared by any number of processes without a central lock::

    store/
      tmp/          files being written (create(), deliver() before publication)
      new/          published messages waiting for a consumer
      cur/          claimed messages: ``<name>~<owner>`` while a consumer holds them
      .consumers/   ``<owner>.lock``: one flock per live consumer

How the queue stays correct when processes die:

* **Delivery** writes the message unnamed (or as ``tmp/<name>``), fsyncs it,
  publishes it into ``new/`` by ``link`` (which, unlike ``rename``, never
  replaces an existing file) and fsyncs ``new/``.  A message is never visible
  half-written.
* **Claiming** is one ``rename`` from ``new/<name>`` to ``cur/<name>~<owner>``.
  The kernel serialises renames of one directory entry: exactly one claimer
  finds the source, every other gets ``ENOENT``.
* **Liveness** comes from a lock, never from a pid: a store holds
  ``.consumers/<owner>.lock`` from its first claim until it is closed or its
  process dies; `FileStore.recover` takes a dead owner's lock and gives its
  claims back to ``new/``.
* **Waking** uses inotify on ``new/``: an idle consumer sleeps in the event
  loop's selector and costs no CPU; without inotify it rescans every 50 ms.
* **Forking**: a child forgets its parent's owner at ``fork()`` and never
  gives back, settles or unlinks anything of the parent's.

One concern per module, lowest first; each imports only the modules above it
and the shared primitives ``_durable``, ``_paths``, ``_threads``, ``_handles``
and ``_flock`` (the lock primitive):

* ``_names``: the layout's paths, maildir names, claimed names, oldest-first order;
* ``_watcher``: the inotify watch and a consumer's backlog of names;
* ``_owners``: consumer locks, fork, `recover` and the dead-consumer probe;
* ``_store``: the gocept store (prepare/create/list/move/copy/clean_tmp), blocking;
* ``_queue``: deliver/claim/settle/status, blocking, with `Message` and `QueueStatus`;
* ``_facade``: the public `FileStore`, one `run_sync` hop per coroutine.

Where the features of a worker pool whose messages can fail (SPEC §3, issue
16) go: a message's attempts and due time in its name (``_names``: it is
stored with the message and survives crashes); sleeping until the earliest
due message in the ``Backlog`` and ``Watcher.wait`` (``_watcher``); visibility
deadlines beside the dead-owner check (``_owners.recover``); ``retry`` and
``extend`` on `Message` and dead letters (``failed/``, ``requeue_failed``) in
``_queue``, with ``failed`` an area of ``Layout``.
"""

from __future__ import annotations

from ._facade import FileStore as FileStore
from ._names import AREAS as AREAS
from ._queue import Message as Message
from ._queue import QueueStatus as QueueStatus

__all__ = ("AREAS", "FileStore", "Message", "QueueStatus")
