"""A batched evolution whose batches a test steps through, or watches go by."""
import threading
import time

from polling import DEADLINE
from tgext.evolve import BatchEvolution


class Stepped(BatchEvolution):
    """``total`` items, one per batch, each a note ``<id>-<n>``.

    Every batch waits for a permit (:meth:`allow`), so that "between batch 2 and batch 3" is a
    fact the test makes; with ``seconds_per_item`` instead, each batch takes that long (the
    work of a real backfill, for a person to watch).  With ``fail_at``, item ``fail_at`` raises
    until ``fixed`` is set."""

    batch_size = max_batch_size = 1

    def __init__(self, evolution_id, model, total=6, fail_at=None, background=False,
                 seconds_per_item=None):
        self.evolution_id = evolution_id
        self.model = model
        self.total = total
        self.fail_at = fail_at
        self.background = background
        self.permits = threading.Semaphore(0)
        self.fixed = threading.Event()
        self.seconds_per_item = seconds_per_item

    def count(self):
        return self.total

    def batch(self, cursor, size):
        done = cursor or 0
        if done >= self.total:
            return None
        if self.seconds_per_item is not None:
            time.sleep(self.seconds_per_item)  # the work itself, not a synchronisation
        elif not self.permits.acquire(timeout=DEADLINE):
            raise RuntimeError(f'{self.evolution_id}: no permit for item {done}')
        if done == self.fail_at and not self.fixed.is_set():
            raise RuntimeError(f'{self.evolution_id} cannot convert item {done}')
        self.model.add_note(f'{self.evolution_id}-{done}')
        return done + 1

    def allow(self, n):
        for _ in range(n):
            self.permits.release()
