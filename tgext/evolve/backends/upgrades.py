"""The versions of tgext.evolve's own storage: the one list of the steps between them.

Loaded only by a process that has something to write (the holder of the lock upgrades), never
on the way of a process that starts on an evolved database and only reads its history.
"""
from typing import NamedTuple, Tuple

from .base import AUDIT_TABLE, HISTORY_TABLE, RANGES_TABLE, SCHEMA_TABLE


class StorageUpgrade(NamedTuple):
    """One step of the stores' version, from ``version - 1`` to ``version``.

    Additive only, so that processes of the previous release keep working on upgraded storage
    (and new code can read old storage while an old process holds the lock): new stores, new
    indexes, new NULLable columns (fields), never a rename, a drop or a NOT NULL.
    """
    version: int
    description: str  # for the log line
    new_stores: Tuple[str, ...] = ()  # tables / collections
    new_columns: Tuple[Tuple[str, str], ...] = ()  # (store, column); Mongo: nothing to do


#: Every step since version 1 (lock and history without a version record), in order: the one
#: list.  Adding a step is appending it here and adding what it adds to the latest definitions
#: (the tables of ``sql_schema.py``, the blank history document of ``ming.py``), which an empty
#: database gets directly.
UPGRADES = (
    StorageUpgrade(2, 'the storage version, recorded in tgext_evolve_schema',
                   new_stores=(SCHEMA_TABLE,)),
    StorageUpgrade(3, 'checkpoints of batched evolutions and operators\' requests in the history, '
                      'the audit trail, key ranges of parallel evolutions',
                   new_stores=(AUDIT_TABLE, RANGES_TABLE),
                   new_columns=tuple((HISTORY_TABLE, name) for name in (
                       'checkpoint', 'batches_done', 'batch_size', 'rate', 'requested',
                       'requested_by', 'requested_at'))),
)
#: The version this release's code reads and writes.
STORAGE_VERSION = UPGRADES[-1].version


def upgrades_after(version: int) -> Tuple[StorageUpgrade, ...]:
    """The steps that take storage of ``version`` to :data:`STORAGE_VERSION`, in order."""
    return tuple(step for step in UPGRADES if step.version > version)
