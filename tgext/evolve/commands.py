"""``gearbox evolve``: see and steer tgext.evolve from a shell or a deploy pipeline.

Argument parsing, printing and exit codes only: what each verb does is in :mod:`.operations`.
Results go to stdout, log lines (the ``tgext.evolve`` logger, configured by gearbox) and errors
to stderr.
"""
import argparse
import contextlib
import datetime
import io
import json
import sys
import time

from gearbox.command import Command

from . import logs, operations
from .errors import ConfigurationError, EvolutionFailed, LockWaitTimeout, OperationRefused
from .records import FAILED, PAUSED
from .runner import RunListener
from .status_document import error_summary as _error_summary, lock_document as _lock_json
from .status_document import progress_document as _progress, record_fields, status_document
from .status_document import iso as _iso, ranges_document, ranges_text
from .status_document import recorded_progress as _recorded_progress

log = logs.cli

EXIT_OK = 0
EXIT_NOT_SETTLED = 1  # status: something pending or failed; run: an evolution failed
EXIT_REFUSED = 2  # bad arguments or configuration, unknown ids, an unsafe request
EXIT_TIMEOUT = 3  # gave up waiting for the lock (--timeout)
EXIT_ERROR = 4  # anything else, e.g. the database cannot be reached (gearbox's own code)
EXIT_INTERRUPTED = 130

EXIT_CODES = '''exit codes:
  0  done; nothing pending or failed (status)
  1  something pending or failed (status); an evolution failed (run)
  2  refused: bad arguments or configuration, unknown id, unsafe request
  3  gave up waiting for the lock (--timeout)
  4  any other error, e.g. the database cannot be reached'''

#: The plain progress display prints at most one line per evolution this often.
PLAIN_PROGRESS_INTERVAL = 1.0


class EvolveCommand(Command):
    """See and steer tgext.evolve: status, history, plan, run, mark, unmark, retry,
    release-lock."""

    def get_parser(self, prog_name):
        parser = super().get_parser(prog_name)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        _application_options(parser, 'development.ini', 'main')
        # The same options after the verb (gearbox users type ``setup-app -c x.ini``); there
        # they have no default, so that one given before the verb is not overwritten, and no
        # place in each verb's usage line (the epilog says it once).
        after_verb = argparse.ArgumentParser(add_help=False)
        _application_options(after_verb, argparse.SUPPRESS, argparse.SUPPRESS, shown=False)
        verbs = parser.add_subparsers(dest='verb', metavar='VERB', required=True)

        def verb(name, help_text):
            return verbs.add_parser(name, help=help_text, description=help_text,
                                    add_help=False, parents=[after_verb])

        def waits(sub):
            sub.add_argument('--timeout', type=float, metavar='SECONDS',
                             help='give up (exit 3) after waiting this long for the lock '
                                  '(default: wait as long as it takes)')

        def takes_ids(sub, force_help, every_help=None):
            sub.add_argument('ids', nargs='*' if every_help else '+', metavar='ID',
                             help='evolution ids')
            if every_help:
                sub.add_argument('--all', action='store_true', dest='every', help=every_help)
            if force_help:
                sub.add_argument('--force', action='store_true', help=force_help)
            waits(sub)

        status = verb('status', 'each evolution\'s state, the lock, progress; exit 1 while '
                                'anything is pending or failed')
        status.add_argument('--json', action='store_true', help='machine-readable output')
        history = verb('history', 'every history record, also of ids no longer registered; '
                                  'with ids: their details and tracebacks')
        history.add_argument('ids', nargs='*', metavar='ID')
        history.add_argument('--json', action='store_true', help='machine-readable output')
        plan = verb('plan', 'what run would do, in order, and why')
        plan.add_argument('--json', action='store_true', help='machine-readable output')
        def reports(sub):
            sub.add_argument('--json', action='store_true',
                             help='print what was done as JSON (see README: "--json of the '
                                  'verbs that change state")')
            return sub

        waits(reports(verb('run', 'run the pending evolutions here, in the foreground')))
        takes_ids(reports(verb('mark', 'record evolutions as applied without running them')),
                  'also record ids no registered evolution has',
                  'every registered evolution (a baseline for a database built by this '
                  'release)')
        takes_ids(reports(verb('unmark', 'forget evolutions, so that the next run runs them')),
                  'also forget ids no registered evolution has')
        takes_ids(reports(verb('retry', 'run a failed evolution again (a batched one from its '
                                        'checkpoint)')), None)
        for name, help_text in (
                ('pause', 'pause an evolution: a batched one at its next batch boundary, one '
                          'that has not started before it starts'),
                ('resume', 'continue a paused evolution from its checkpoint')):
            reports(verb(name, help_text)).add_argument('id', metavar='ID',
                                                        help='evolution id')
        reports(verb('release-lock', 'release the lock of a process that is gone')).add_argument(
            '--force', action='store_true',
            help='break the lock even while its lease is valid (recorded with your name)')
        usages = ''.join('  ' + sub.format_usage()[len('usage: '):]
                         for sub in verbs.choices.values())
        parser.epilog = (f'verbs (-c and -n may also follow the verb):\n{usages}\n'
                         f'{EXIT_CODES}')
        return parser

    def take_action(self, opts):
        if getattr(opts, 'json', False) and opts.verb in WRITE_VERBS:
            return self._reporting_json(opts)
        return self._take_action(opts)

    def _reporting_json(self, opts):
        """Run the verb with its text output captured, and print the write report instead."""
        global _captured_errors
        lines, _captured_errors = io.StringIO(), []
        opts.report = {}
        try:
            with contextlib.redirect_stdout(lines):
                exit_code = self._take_action(opts)
        finally:
            errors, _captured_errors = _captured_errors, None
        _print_json(write_report(opts.verb, exit_code, lines.getvalue().splitlines(), errors,
                                 **opts.report))
        return exit_code

    def _take_action(self, opts):
        try:
            service = operations.load_service(opts.config_file, opts.app_name)
            warning = operations.process_local_warning(service)
            if warning is not None:
                _error(warning)
            return _VERBS[opts.verb](service, opts)
        except (ConfigurationError, OperationRefused) as e:
            _error(e)
            return EXIT_REFUSED
        except LockWaitTimeout as e:
            _error(e)
            return EXIT_TIMEOUT
        except KeyboardInterrupt:
            _error('interrupted')
            return EXIT_INTERRUPTED
        except Exception as e:
            if getattr(self.app.options, 'debug', False):
                raise  # gearbox --debug prints the traceback
            _error(f'{type(e).__name__}: {e}')
            return EXIT_ERROR


def _application_options(parser, config_default, app_name_default, shown=True):
    parser.add_argument('-c', '--config', dest='config_file', default=config_default,
                        help='the application\'s .ini (default: development.ini)' if shown
                        else argparse.SUPPRESS)
    parser.add_argument('-n', '--app-name', default=app_name_default,
                        help='its [app:NAME] section (default: main)' if shown
                        else argparse.SUPPRESS)


# --- output helpers ------------------------------------------------------------------------------

def _say(*lines):
    for line in lines:
        print(line, flush=True)


#: While a verb reports as JSON: the errors it printed, for the report's ``error``.
_captured_errors = None


def _error(message):
    if _captured_errors is not None:
        _captured_errors.append(str(message))
    print(f'gearbox evolve: {message}', file=sys.stderr, flush=True)


#: The verbs that change state, and so take ``--json`` for :func:`write_report`.
WRITE_VERBS = ('run', 'mark', 'unmark', 'retry', 'pause', 'resume', 'release-lock')


def write_report(verb, exit_code, messages, errors, *, changed=(), unchanged=(), gate=None,
                 lock=None):
    """The one JSON document every verb that changes state prints with ``--json``.

    ``ok``: the verb did what it was asked (exit code 0).  ``changed``: the ids whose history
    it changed or asked something of (``run``: those it applied); ``unchanged``: the ids it
    was given and left as they were.  ``gate``: for ``pause``, ``"closed"`` when the paused
    evolution is blocking (every process answers 503 until it is resumed), ``"open"`` for a
    background one; otherwise None.  ``lock``: for ``release-lock``, the lock as it was
    before.  ``messages``: the text output, line by line; ``error``: why it was refused or
    failed, else None.
    """
    return {'verb': verb, 'ok': exit_code == EXIT_OK, 'exit_code': exit_code,
            'changed': list(changed), 'unchanged': list(unchanged), 'gate': gate,
            'lock': _lock_json(lock) if lock is not None else None,
            'messages': messages, 'error': '; '.join(errors) if errors else None}


def _report(opts, **fields):
    """What the JSON report of this verb says (nothing without --json)."""
    report = getattr(opts, 'report', None)
    if report is not None:
        report.update(fields)


def _when(timestamp):
    if timestamp is None:
        return '-'
    return datetime.datetime.fromtimestamp(timestamp).strftime('%Y-%m-%d %H:%M:%S')


def _duration(ms):
    if ms is None:
        return '-'
    return f'{ms:.0f} ms' if ms < 10_000 else f'{ms / 1000:.1f} s'


def _attempts(count):
    return f'{count} attempt{"" if count == 1 else "s"}'


def _progress_text(progress):
    if progress['total']:
        text = f'{progress["done"]}/{progress["total"]} ({progress["percent"]:.0f}%)'
    else:
        text = f'{progress["done"]} done'
    if progress.get('batches') is not None:
        text += f', {progress["batches"]} batch{"" if progress["batches"] == 1 else "es"}'
        if progress.get('batch_size'):
            text += f' (next of {progress["batch_size"]})'
    if progress.get('rate'):
        text += f', {progress["rate"]:.0f} items/s'
    if progress.get('eta_seconds') is not None:
        text += f', about {_seconds(progress["eta_seconds"])} left'
    return text


def _seconds(seconds):
    if seconds < 120:
        return f'{seconds:.0f} s'
    if seconds < 7200:
        return f'{seconds / 60:.0f} min'
    return f'{seconds / 3600:.1f} h'


def _lock_text(lock):
    if lock is None:
        return 'lock: never taken'
    if lock.owner is None:
        if lock.broken_by:
            by = f', broken by {lock.broken_by}'
        else:
            by = f', released by {lock.released_by}' if lock.released_by else ''
        return f'lock: free (generation {lock.generation}{by})'
    if lock.held:
        return (f'lock: held by {lock.owner} (generation {lock.generation}) since '
                f'{_when(lock.acquired_at)}; lease expires in {lock.expires_in:.1f} s')
    return (f'lock: left by {lock.owner} (generation {lock.generation}), lease expired '
            f'{-lock.expires_in:.1f} s ago: the next process takes it over')


def _print_json(data):
    _say(json.dumps(data, indent=2))


# --- status, history, plan -----------------------------------------------------------------------

def _status_detail(evolution):
    record = evolution.record
    if evolution.running_now:
        progress = _recorded_progress(record)
        shown = f', {_progress_text(progress)}' if progress else ''
        return f'since {_when(record.started_at)}{shown}, by {record.owner}'
    if evolution.state == FAILED:
        return (f'{_when(record.finished_at)}, attempt {record.attempts}: '
                f'{_error_summary(record.error)}')
    if evolution.state == PAUSED:
        progress = _recorded_progress(record)
        return evolution.reason + (f', {_progress_text(progress)}' if progress else '')
    if evolution.reason is not None:
        return evolution.reason
    return f'{_when(record.finished_at)}, {_duration(record.duration_ms)}, by {record.owner}'


def _status(service, opts):
    status = operations.status(service)
    if opts.json:
        _print_json(status_document(status))
    else:
        counts = {}
        for evolution in status.evolutions:
            counts[evolution.state] = counts.get(evolution.state, 0) + 1
        summary = ', '.join(f'{n} {state}' for state, n in counts.items())
        _say(f'{len(status.evolutions)} evolutions: {summary}')
        width = max(len(e.evolution_id) for e in status.evolutions)
        for evolution in status.evolutions:
            _say(f'  {evolution.evolution_id:<{width}}  {evolution.state:<8}  '
                 f'{_status_detail(evolution)}')
            ranges = status.ranges.get(evolution.evolution_id)
            if ranges:
                _say(f'  {"":<{width}}  {ranges_text(ranges_document(ranges))}')
        _say(_lock_text(status.lock))
        if status.unregistered:
            _say('also in history but no longer registered (see history): '
                 + ', '.join(r.evolution_id for r in status.unregistered))
    return EXIT_OK if status.settled else EXIT_NOT_SETTLED


def _history_detail(record, registered):
    progress = _recorded_progress(record)
    lines = [f'{record.evolution_id}{"" if registered else "  (not registered)"}',
             f'  state:       {record.state}',
             f'  attempts:    {record.attempts}',
             f'  started:     {_when(record.started_at)}',
             f'  finished:    {_when(record.finished_at)}',
             f'  duration:    {_duration(record.duration_ms)}',
             f'  owner:       {record.owner} (generation {record.generation})']
    if progress:
        lines.append(f'  progress:    {_progress_text(progress)}')
    if record.checkpoint is not None:
        lines.append(f'  checkpoint:  {record.checkpoint} (the next batch starts after it)')
    if record.fingerprint:
        lines.append(f'  fingerprint: {record.fingerprint}')
    if record.error:
        lines.append('  error:')
        lines.extend(f'    {line}' for line in record.error.rstrip().splitlines())
    return lines


def _audit_json(entry):
    return {'at': _iso(entry.at), 'action': entry.action, 'actor': entry.actor,
            'host': entry.host, 'detail': entry.detail, 'error': entry.error}


def _audit_lines(entries):
    if not entries:
        return ['  audit:       nothing recorded']
    lines = ['  audit:']
    width = max(len(entry.action) for entry in entries)
    for entry in entries:
        detail = f': {entry.detail}' if entry.detail else ''
        lines.append(f'    {_when(entry.at)}  {entry.action:<{width}}  by {entry.actor} on '
                     f'{entry.host}{detail}')
        if entry.error:
            lines.extend(f'      {line}' for line in entry.error.rstrip().splitlines())
    return lines


def _history(service, opts):
    rows = operations.history(service, opts.ids)
    trails = {r.evolution_id: operations.audit(service, r.evolution_id)
              for r, _ in rows} if opts.ids else {}
    if opts.json:
        _print_json([dict({'id': r.evolution_id, 'registered': registered, 'state': r.state},
                          **record_fields(r), traceback=r.error, fingerprint=r.fingerprint,
                          checkpoint=r.checkpoint,
                          **({'audit': [_audit_json(e) for e in trails[r.evolution_id]]}
                             if opts.ids else {}))
                     for r, registered in rows])
    elif opts.ids:
        for record, registered in rows:
            _say(*_history_detail(record, registered), *_audit_lines(trails[record.evolution_id]))
    elif not rows:
        _say('history is empty')
    else:
        width = max(len(record.evolution_id) for record, _ in rows)
        for record, registered in rows:
            _say(f'  {record.evolution_id:<{width}}  {record.state:<8}  '
                 f'{_when(record.started_at)}  {_duration(record.duration_ms):>8}  '
                 f'{_attempts(record.attempts)}  '
                 f'{record.owner}{"" if registered else "  (not registered)"}')
            if record.error:
                _say(f'  {"":<{width}}  {_error_summary(record.error)}')
    return EXIT_OK


def _plan(service, opts):
    plan = operations.plan(service)
    if opts.json:
        _print_json({'steps': [{'id': i.evolution_id, 'action': i.action, 'reason': i.reason}
                               for i in plan.items],
                     'wait_for': _lock_json(plan.wait_for)})
        return EXIT_OK
    if not plan.items:
        _say(f'nothing to do: all {len(service.evolutions)} evolutions are applied')
        return EXIT_OK
    if plan.wait_for is not None:
        _say(f'run would first wait for the {_lock_text(plan.wait_for)}')
    _say('run would, in order:')
    width = max(len(i.evolution_id) for i in plan.items)
    for number, item in enumerate(plan.items, 1):
        _say(f'  {number}. {item.action:<5}  {item.evolution_id:<{width}}  {item.reason}')
    return EXIT_OK


# --- run and the writes --------------------------------------------------------------------------

class _WaitReporter:
    """Says once per lock holder that we are waiting for it."""

    def __init__(self):
        self._seen = None

    def __call__(self, lock):
        key = None if lock is None else (lock.owner, lock.generation)
        if key == self._seen:
            return
        self._seen = key
        _say(f'waiting for the {_lock_text(lock)}' if lock is not None
             else 'waiting for the lock')


class _ProgressDisplay(RunListener):
    """Shows ``Evolution.progress()``: its failures are logged, never raised into
    ``evolve()`` (a closed terminal must not fail an evolution)."""

    _disabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def progress(self, evolution_id, done, total):
        self._guard(self.show, evolution_id, done, total)

    def finished(self, evolution_id):
        self._guard(self.close)

    def _guard(self, method, *args):
        if self._disabled:
            return
        try:
            method(*args)
        except Exception as e:
            self._disabled = True
            log.warning('progress display disabled: %s: %s', type(e).__name__, e)

    def show(self, evolution_id, done, total):
        raise NotImplementedError

    def close(self):
        pass


class _NoProgress(_ProgressDisplay):
    """With --json: the report is the output, no progress lines in it."""

    def show(self, evolution_id, done, total):
        pass


class _PlainProgress(_ProgressDisplay):
    """``<id>: done/total (percent)`` lines, at most one a second, and the last one."""

    def __init__(self):
        self._shown = None
        self._shown_at = 0.0

    def show(self, evolution_id, done, total):
        shown = (evolution_id, done, total)
        now = time.monotonic()
        if shown == self._shown:
            return
        complete = bool(total) and done >= total
        same_evolution = self._shown is not None and self._shown[0] == evolution_id
        if same_evolution and not complete and now - self._shown_at < PLAIN_PROGRESS_INTERVAL:
            return
        self._shown, self._shown_at = shown, now
        _say(f'{evolution_id}: {_progress_text(_progress(done, total))}')

    def close(self):
        self._shown = None


class _ProgressBars(_ProgressDisplay):
    """One tqdm bar per evolution that reports progress; log lines print above the bars."""

    def __init__(self, tqdm, redirect_logs):
        self._tqdm = tqdm
        self._redirect = redirect_logs()
        self._bar = None

    def __enter__(self):
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc):
        self.close()
        self._redirect.__exit__(*exc)

    def show(self, evolution_id, done, total):
        if self._bar is None:
            self._bar = self._tqdm(desc=evolution_id, total=total, dynamic_ncols=True)
        elif total != self._bar.total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _progress_display():
    """Bars with tqdm (the ``cli`` extra) on a terminal, plain lines otherwise."""
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm
        except ImportError:
            pass
        else:
            return _ProgressBars(tqdm, logging_redirect_tqdm)
    return _PlainProgress()


def _say_applied(applied):
    if applied:
        _say(f'applied {len(applied)} evolution(s): {", ".join(applied)}')


def _run(service, opts):
    try:
        with (_NoProgress() if getattr(opts, 'json', False) else
              _progress_display()) as display:
            result = operations.run(service, listener=display, on_wait=_WaitReporter(),
                                    timeout=opts.timeout)
    except EvolutionFailed as e:
        _say_applied(e.applied)
        _report(opts, changed=e.applied)
        _error(f'{e} (traceback: gearbox evolve history {e.evolution_id})')
        return EXIT_NOT_SETTLED
    _say_applied(result.applied)
    _report(opts, changed=result.applied)
    if result.paused is not None:
        _error(f'{result.paused} is paused: nothing after it runs until gearbox evolve resume '
               f'{result.paused}')
        return EXIT_NOT_SETTLED
    if result.ok:
        if not result.applied:
            _say(f'nothing to do: all {len(service.evolutions)} evolutions are applied')
        return EXIT_OK
    _error(f'stopped with evolutions still pending ({result.phase}): see the log above and '
           f'gearbox evolve status')
    return EXIT_NOT_SETTLED


#: verb: (operation, what is said of the ids it changed, of those it left alone)
_HISTORY_WRITES = {
    'mark': (operations.mark, 'marked as applied', 'already applied, left as recorded'),
    'unmark': (operations.unmark, 'forgotten (the next run runs them)', 'nothing recorded for'),
}


def _mark_or_unmark(service, opts):
    operation, changed, unchanged = _HISTORY_WRITES[opts.verb]
    if getattr(opts, 'every', False):
        if opts.ids or opts.force:
            raise OperationRefused('mark: --all takes no ids and no --force')
        result = operations.mark_all(service, on_wait=_WaitReporter(), timeout=opts.timeout)
    elif not opts.ids:
        raise OperationRefused(f'{opts.verb}: name the evolutions (ID ...), or use --all')
    else:
        result = operation(service, opts.ids, force=opts.force, on_wait=_WaitReporter(),
                           timeout=opts.timeout)
    for said, ids in ((changed, result.changed), (unchanged, result.unchanged)):
        if ids:
            _say(f'{said}: {", ".join(ids)}')
    _report(opts, changed=result.changed, unchanged=result.unchanged)
    return EXIT_OK


def _retry(service, opts):
    cleared = operations.retry(service, opts.ids, on_wait=_WaitReporter(), timeout=opts.timeout)
    for record in cleared:
        _say(f'cleared the failed state of {record.evolution_id} ({_attempts(record.attempts)}, '
             f'last: {_error_summary(record.error)}): the next run retries it'
             f'{", from its checkpoint" if record.checkpoint is not None else ""}')
    _report(opts, changed=[record.evolution_id for record in cleared])
    return EXIT_OK


def _pause(service, opts):
    result = operations.pause(service, opts.id)
    if result.outcome == 'paused':
        _say(f'paused {result.evolution_id} before it started')
    else:
        _say(f'pause of {result.evolution_id} requested: it stops at its next batch boundary, '
             f'its checkpoint committed (gearbox evolve status shows it paused)')
    if result.blocking:
        _say(f'{result.evolution_id} is a blocking evolution: while it is paused the gate stays '
             f'closed (every process answers 503) until gearbox evolve resume '
             f'{result.evolution_id}')
    else:
        _say(f'{result.evolution_id} runs in the background: the site keeps serving while it '
             f'is paused')
    _report(opts, changed=[result.evolution_id], gate='closed' if result.blocking else 'open')
    return EXIT_OK


def _resume(service, opts):
    result = operations.resume(service, opts.id)
    record = result.record
    where = (f' from its checkpoint ({record.progress_done or 0} items done)'
             if record.checkpoint is not None else '')
    _say(f'resume of {result.evolution_id} requested: the process holding the lock (or the '
         f'next one to take it, within {service.settings.poll_interval:g} s) continues it'
         f'{where}')
    _report(opts, changed=[result.evolution_id])
    return EXIT_OK


def _release_lock(service, opts):
    result = operations.release_lock(service, force=opts.force)
    lock = result.lock
    _report(opts, lock=lock)
    if result.action == 'free':
        _say('the lock is free: nothing to release')
    elif result.action == 'released':
        _say(f'released the lock left by {lock.owner} (generation {lock.generation}, '
             f'{result.why})')
    else:
        _say(f'broke the lock held by {lock.owner} (generation {lock.generation}); recorded as '
             f'broken by {result.broken_by}')
    return EXIT_OK


_VERBS = {
    'status': _status, 'history': _history, 'plan': _plan, 'run': _run,
    'mark': _mark_or_unmark, 'unmark': _mark_or_unmark, 'retry': _retry,
    'pause': _pause, 'resume': _resume, 'release-lock': _release_lock,
}
