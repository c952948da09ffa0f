"""What operators trip over (issue 12): ``gearbox evolve`` run as a real subprocess against the
``tests/cliapp`` application, as in ``test_cli.py`` (whose helpers these tests share)."""
import re

import pytest

from test_cli import (IDS, SQLITE_ONLY, CliApp, cliapp, status_lines)  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


# --- -c and -n after the verb --------------------------------------------------------------------

@SQLITE_ONLY
def test_config_and_app_name_may_follow_the_verb(cliapp):
    production = cliapp.directory / 'production.ini'
    production.write_text(cliapp.ini.read_text().replace('[app:main]', '[app:site]'))
    cliapp.ini.unlink()  # the default would fail: only the options given can make it work

    after = cliapp.gearbox('status', '-c', 'production.ini', '-n', 'site')
    assert after.returncode == 1, after
    assert status_lines(after) == {i: ('pending', 'never applied') for i in IDS}, after

    mixed = cliapp.gearbox('-c', 'production.ini', 'mark', 'seed_effects', '--app-name', 'site')
    assert mixed.returncode == 0, mixed
    assert cliapp.history()['seed_effects'].state == 'marked'

    # Given before the verb, an option is not undone by the verb's own (absent) one.
    before = cliapp.gearbox('--config', 'production.ini', '-n', 'site', 'plan')
    assert before.returncode == 0, before
    assert re.findall(r'^  \d+\. run\s+(\S+)', before.stdout, re.M) == IDS[1:], before

    wrong = cliapp.gearbox('status', '-c', 'production.ini')  # no [app:main] in it
    assert wrong.returncode == 2, wrong
    assert 'production.ini' in wrong.stderr, wrong
