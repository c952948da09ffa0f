"""Waiting for a condition with a deadline: how every test, and every ``bench/`` script, waits
for other threads and processes (never a bare sleep).

The one wait-until helper.  "Soon" differs between callers (a thread of the test process, a
cluster of real processes importing TurboGears on a loaded machine): each passes its own
deadline where the default does not fit.
"""
import time

#: How long a test waits for what its own process does "soon", on a shared, loaded machine.
DEADLINE = 30.0
#: How often the condition is looked at.
POLL = 0.02


def wait_until(condition, what, timeout=DEADLINE, interval=POLL):
    """Call ``condition()`` until it returns something truthy; return it, or fail naming
    ``what`` once ``timeout`` seconds have passed.  An exception from ``condition`` (a process
    that died) ends the wait at once."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f'{what}: not reached within {timeout:g} s')
        time.sleep(interval)
