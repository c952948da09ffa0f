"""Waiting for a condition with a deadline: how every test synchronises with other threads and
processes (never a bare sleep)."""
import time


def wait_until(condition, what, timeout, interval=0.02):
    """Call ``condition()`` until it returns something truthy; return it, or fail naming
    ``what`` once ``timeout`` seconds have passed."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f'{what}: not reached within {timeout:g} s')
        time.sleep(interval)
