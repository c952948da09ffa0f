"""Processes waiting on 503 for a blocking evolution serve as soon as it is applied, while the
lock holder goes on with a background evolution (issue 14)."""
import pytest

from cluster import Cluster
from polling import wait_until

pytestmark = pytest.mark.slow

POLL_INTERVAL = 0.5
#: Well past one poll_interval, well short of the 120 s a held evolution is waited for.
SERVING_DEADLINE = 30.0


def test_waiting_processes_serve_while_the_holder_runs_a_background_evolution(sql_url,
                                                                             tmp_path):
    evolutions = [{'id': 'blocking', 'steps': ['write', 'hold']},
                  {'id': 'backfill', 'steps': ['hold', 'write'], 'background': True}]
    with Cluster(sql_url, tmp_path, evolutions,
                 options={'poll_interval': POLL_INTERVAL}) as cluster:
        cluster.prepare_database()
        processes = cluster.start(3)
        cluster.wait_entered('blocking')
        cluster.wait_all_observed(503, processes)  # every one waits behind the 503
        cluster.release('blocking')
        cluster.wait_entered('backfill')
        # The background evolution is still held, its lock still taken: yet every process,
        # not only its holder, serves.
        cluster.wait_serving(processes, timeout=SERVING_DEADLINE)
        assert cluster.history()['backfill'].state == 'running'
        assert all(p.observed == [503, 200] for p in processes)
        cluster.release('backfill')
        wait_until(lambda: cluster.history()['backfill'].state == 'applied',
                   'the background evolution applied', SERVING_DEADLINE)
        assert cluster.side_effects() == {'blocking': 1, 'backfill': 1}
