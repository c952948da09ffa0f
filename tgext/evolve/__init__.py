"""tgext.evolve: data evolutions run exactly once across a TurboGears cluster, behind a 503 gate.

The public API is what this module exports; everything else is internal.
"""
from .alembic_upgrade import AlembicUpgrade
from .errors import (ConfigurationError, EvolutionFailed, EvolveError, LeaseLost, LockWaitTimeout,
                     OperationRefused, TransactionEscaped)
from .evolution import BatchEvolution, Evolution
from .plugin import plugme
from .status_page import EvolveStatusController

__version__ = '1.0.0.dev0'

__all__ = ['plugme', 'Evolution', 'BatchEvolution', 'AlembicUpgrade', 'EvolveStatusController',
           'EvolveError', 'ConfigurationError', 'LeaseLost', 'EvolutionFailed',
           'OperationRefused', 'LockWaitTimeout', 'TransactionEscaped', '__version__']
