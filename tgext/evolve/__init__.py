"""tgext.evolve: data evolutions run exactly once across a TurboGears cluster, behind a 503 gate.

The public API is what this module exports; everything else is internal.
"""
from .alembic_upgrade import AlembicUpgrade
from .errors import (ClaimLost, ConfigurationError, EvolutionFailed, EvolveError, LeaseLost,
                     LockWaitTimeout, OperationRefused, TransactionEscaped)
from .evolution import BatchEvolution, Evolution
from .plugin import plugme
from .status_page import EvolveStatusController

__version__ = '1.0.0.dev0'


def baseline(config, *, timeout=None):
    """Record every registered evolution as applied on a freshly created database (call it in
    ``websetup`` after creating the schema): see :func:`tgext.evolve.operations.baseline`."""
    from .operations import baseline as record_baseline  # only setup-app pays its import
    return record_baseline(config, timeout=timeout)


__all__ = ['plugme', 'baseline', 'Evolution', 'BatchEvolution', 'AlembicUpgrade',
           'EvolveStatusController', 'EvolveError', 'ConfigurationError', 'LeaseLost',
           'ClaimLost', 'EvolutionFailed', 'OperationRefused', 'LockWaitTimeout',
           'TransactionEscaped', '__version__']
