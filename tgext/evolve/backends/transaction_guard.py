"""Refusing ``transaction.commit()`` and ``transaction.abort()`` from inside an evolution.

0.0.5 told users to commit their transaction themselves.  Such an evolution, run as it is,
commits its work before the fencing check and the ``applied`` record (so a failure, a lost
lease or a kill after it applies the work twice), or throws its work away and is recorded
``applied`` (an abort).  :class:`TransactionGuard` is joined to the evolution's transaction
while its work runs: a commit of that transaction fails before any resource commits (every
data manager's ``tpc_begin`` runs before any of them writes), an abort fails after the work is
rolled back, and a transaction begun after either is refused too, so nothing of the evolution
is ever committed.  The error says what to remove.
"""
import transaction

from ..errors import TransactionEscaped

_REMOVE = ('tgext.evolve commits the work of an evolution itself, together with its history '
           'record and the check that this process still holds the lock: remove '
           'transaction.commit(), transaction.abort() and transaction.begin() (and any commit '
           'of DBSession) from {where}; use transaction.savepoint() to undo part of the work')


class _NoOpSavepoint:
    def rollback(self):
        pass


class TransactionGuard:
    """A data manager and synchronizer of ``manager`` while ``where`` (``evolve()``, a batch)
    runs; :meth:`disarm` before tgext.evolve commits or aborts the transaction itself."""

    transaction_manager = None

    def __init__(self, where, manager=transaction.manager):
        self.where = where
        self.manager = manager
        self.refused = None  # 'commit', 'abort' or 'begin' once the work tried it
        self._txn = None
        self._armed = False

    # --- the guard's life --------------------------------------------------------------------

    def arm(self):
        self._txn = self.manager.get()
        self._txn.join(self)
        self.manager.registerSynch(self)
        self._armed = True

    def disarm(self):
        """Called after the work returned or raised: raises TransactionEscaped if the work
        committed, aborted or replaced the transaction (even when it caught the refusal)."""
        self._armed = False
        self.manager.unregisterSynch(self)
        if self.refused is None and self.manager.get() is not self._txn:
            self.refused = 'begin'  # a transaction of its own, by a way not seen above
        if self.refused is not None:
            raise self._error()

    def session_commit_refused(self):
        """The error for zope.sqlalchemy's refusal of ``DBSession.commit()``, which says only
        "Transaction must be committed using the transaction manager"."""
        self.refused = self.refused or 'DBSession.commit'
        return self._error()

    def _refuse(self, what):
        if self.refused is None:
            self.refused = what
        raise self._error()

    def _error(self):
        did = ('began a transaction of its own' if self.refused == 'begin' else
               'called DBSession.commit()' if self.refused == 'DBSession.commit' else
               f'called transaction.{self.refused}()')
        return TransactionEscaped(f'{self.where} {did}: refused, nothing of it is committed. '
                                  + _REMOVE.format(where=self.where))

    # --- IDataManager --------------------------------------------------------------------------

    def tpc_begin(self, txn):
        if self._armed:
            self._refuse('commit')

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        pass

    def tpc_finish(self, txn):
        pass

    def tpc_abort(self, txn):
        pass

    def abort(self, txn):
        # Also called when a refused commit cleans up: the first refusal is the one reported.
        if self._armed and self.refused is None:
            self._refuse('abort')

    def sortKey(self):  # noqa: N802 - the transaction package's spelling
        return '!tgext.evolve.guard'  # before zope.sqlalchemy's '~sqlalchemy:...'

    def savepoint(self):
        # Savepoints are the way to undo part of the work: they must keep working with the
        # guard joined (a data manager without savepoint() makes every savepoint fail).
        return _NoOpSavepoint()

    # --- ISynchronizer -------------------------------------------------------------------------

    def beforeCompletion(self, txn):  # noqa: N802
        # Called before any commit (or abort) of this thread's transactions.  One that is not
        # the evolution's was begun by the work after a refusal it caught: it must not commit
        # either.
        if self._armed and txn is not self._txn:
            if self.refused is None:
                self.refused = 'begin'
            raise self._error()

    def afterCompletion(self, txn):  # noqa: N802
        pass

    def newTransaction(self, txn):  # noqa: N802
        pass
