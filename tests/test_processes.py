"""Many real application processes started at once on one database (issue 2).

Each process is ``tests/procapp.py``: a TurboGears 2.5 FullStack application with tgext.evolve,
served over HTTP on 127.0.0.1, asking itself ``GET /`` from its first moment and recording what
it saw.  Its three evolutions write one row each through ``model.DBSession``; the second holds
(row written, not committed) until every process has answered a 503, so that each one must be
seen closed before it is seen open.
"""
import pytest

import fault_scenarios

PROCESSES = 8

pytestmark = pytest.mark.slow


def test_processes_started_at_once_run_each_evolution_once_and_serve_after(sql_url, tmp_path):
    outcome = fault_scenarios.start_together(sql_url, tmp_path, PROCESSES, late=True)

    # Also: every process observed exactly 503 then 200 and logged no error or tgext.evolve
    # warning; a process started on the evolved database never answered 503.
    assert outcome.problems() == []
    assert len(outcome.observed) == PROCESSES
    assert outcome.measures['late'] == [200]
    # The latecomer only read the history: it never built the lock and history tables.
    built = outcome.measures['built_sql_tables']
    assert built == {name: not name.startswith('late') for name in built}
    # Exactly one row per evolution, committed together with its history record.
    assert outcome.side_effects == {'e1': 1, 'e2': 1, 'e3': 1}
    assert all(record.attempts == 1 for record in outcome.history.values())
    # Registration order is run order.
    started = sorted(outcome.history.values(), key=lambda record: record.started_at)
    assert [record.evolution_id for record in started] == ['e1', 'e2', 'e3']
