"""The evolutions, steered by ``cliapp.*`` keys of the .ini (read from ``self.config``)."""
import os
import time

from tg.support.converters import asbool

from tgext.evolve import Evolution

from .model import DBSession, Effect

#: How long ``count_slowly`` waits for its pause file before giving up.
PAUSE_LIMIT = 120.0


class _RecordsItself(Evolution):
    def record(self):
        DBSession.add(Effect(evolution_id=self.evolution_id))


class SeedEffects(_RecordsItself):
    evolution_id = 'seed_effects'

    def evolve(self):
        self.record()


class CountSlowly(_RecordsItself):
    """Reports progress over 10 units; with ``cliapp.pause_file`` set, it stops at 3/10 until
    that file exists (so that a test can look at a running evolution)."""
    evolution_id = 'count_slowly'
    total = 10
    pause_at = 3

    def evolve(self):
        pause_file = self.config.get('cliapp.pause_file')
        for done in range(self.total + 1):
            self.progress(done, self.total)
            if done == self.pause_at and pause_file:
                self._wait_for(pause_file)
        self.record()

    def _wait_for(self, path):
        deadline = time.monotonic() + PAUSE_LIMIT
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise RuntimeError(f'{path} did not appear within {PAUSE_LIMIT} s')
            time.sleep(0.05)
            self.progress(self.pause_at, self.total)  # raises LeaseLost once the lock is lost


class MaybeFail(_RecordsItself):
    evolution_id = 'maybe_fail'
    # A test gives it a dependency that nothing registers (read when the app is imported).
    depends_on = tuple(filter(None, [os.environ.get('CLIAPP_MAYBE_FAIL_DEPENDS_ON')]))

    def evolve(self):
        self.record()
        if asbool(self.config.get('cliapp.fail', False)):
            raise RuntimeError('cliapp.fail is set')


EVOLUTIONS = [SeedEffects, CountSlowly, MaybeFail]
