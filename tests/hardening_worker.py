"""One process of ``test_hardening.py``'s multi-process cases: a runner on a SQL database with
an application-like session (``zope.sqlalchemy``), its evolution chosen by name.

    python tests/hardening_worker.py '<json job>'

The job: ``url``, ``scenario`` (a key of :data:`SCENARIOS`), ``lease``, ``result`` (a file).
The process runs its runner's thread until the gate opens or the runner reports a failure
(the thread lives on and follows ``on_failure``: that is asserted too), then writes
``{"phase": ..., "thread_alive": ...}`` to ``result`` and exits 0.  An evolution may also end
the process itself (``os._exit``), as a kill would.
"""
import json
import os
import sys
import time

import sqlalchemy as sa
import transaction
import zope.sqlalchemy
from sqlalchemy import orm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import SideEffect  # noqa: E402
from tgext.evolve import Evolution  # noqa: E402
from tgext.evolve.backends.sqlalchemy import SQLAlchemyBackend  # noqa: E402
from tgext.evolve.options import Settings  # noqa: E402
from tgext.evolve.runner import Runner  # noqa: E402
from tgext.evolve.state import BLOCKED, READY, SERVING_AFTER_FAILURE  # noqa: E402

DEADLINE = 60.0


def commit_then_die(session):
    # 0.0.5's advice ("commit your transaction yourself"), then a kill before tgext.evolve
    # could record the evolution: the next holder runs it again.
    session.add(SideEffect(key='escaped'))
    session.flush()
    transaction.commit()
    os._exit(3)


def exit_from_evolve(session):
    session.add(SideEffect(key='escaped'))
    session.flush()
    sys.exit(4)


SCENARIOS = {'commit-then-die': commit_then_die, 'sys-exit': exit_from_evolve}


def main(job):
    engine = sa.create_engine(job['url'])
    session = orm.scoped_session(orm.sessionmaker(bind=engine))
    zope.sqlalchemy.register(session)
    body = SCENARIOS[job['scenario']]
    evolution = type('Scenario', (Evolution,), {
        'evolution_id': job['scenario'], 'evolve': lambda self: body(session)})()
    runner = Runner(SQLAlchemyBackend(engine, session), [evolution],
                    Settings(lease=job['lease'], poll_interval=0.05,
                             on_failure=job.get('on_failure', 'block')))
    runner.start()
    end = time.monotonic() + DEADLINE
    while runner.state.phase not in (READY, BLOCKED, SERVING_AFTER_FAILURE):
        if time.monotonic() > end or not runner.alive:
            break
        time.sleep(0.02)
    if runner.state.phase in (READY, SERVING_AFTER_FAILURE):
        runner.stop(DEADLINE)  # the gate is open: the thread ends its loop, and has nothing left
    with open(job['result'], 'w') as f:
        json.dump({'phase': runner.state.phase, 'thread_alive': runner.alive}, f)
    runner.stop(5)


if __name__ == '__main__':
    main(json.loads(sys.argv[1]))
