"""The application's model on Ming, for the tests of ``gearbox evolve`` against ``mim://``
(``CLIAPP_MING`` set in the environment): a session and nothing else."""
import ming
from ming.odm import ThreadLocalODMSession

_session = ming.Session()
DBSession = ThreadLocalODMSession(_session)


def init_model(datastore):
    _session.bind = datastore
