"""The status page's HTML, built from the status document with the standard library only.

No template engine: the page must render in any application, whatever renderers it configured,
and without its static files (the CSS and JavaScript are inlined).  ``page.js`` updates the very
elements built here from ``status.json``; the few formatting rules it repeats (times, durations,
progress, the lease, the ranges) are kept side by side with the Python ones.
"""
import datetime
import functools
import html
import importlib.resources
import json

from ..status_document import ranges_text

DASH = '\u2013'

#: Longest traceback shown inline; longer ones keep their head and tail.
TRACEBACK_LIMIT = 100_000


@functools.lru_cache(maxsize=None)
def _asset(name):
    return importlib.resources.files(__package__).joinpath(name).read_text('utf-8')


def _e(value):
    return html.escape('' if value is None else str(value))


# --- formatting: page.js has the same rules -------------------------------------------------------

def when(iso):
    return f'{iso[:19].replace("T", " ")} UTC' if iso else DASH


def seconds_text(seconds):
    seconds = round(seconds)
    if seconds < 60:
        return f'{seconds} s'
    if seconds < 3600:
        return f'{seconds // 60} min {seconds % 60} s'
    return f'{seconds // 3600} h {seconds % 3600 // 60} min'


def duration_text(ms):
    if ms is None:
        return DASH
    return f'{ms:.0f} ms' if ms < 10_000 else f'{ms / 1000:.1f} s'


def progress_text(progress):
    if progress['total']:
        text = f'{progress["done"]}/{progress["total"]} ({progress["percent"]:.0f}%)'
    else:
        text = f'{progress["done"]} done'
    if progress.get('rate') is not None:
        text += f' \u00b7 {progress["rate"]:.1f}/s'
    if progress.get('eta_seconds') is not None:
        text += f' \u00b7 ETA {seconds_text(progress["eta_seconds"])}'
    return text


def lock_fields(lock):
    if lock is None:
        return {'owner': 'never taken', 'lease': DASH, 'generation': DASH,
                'acquired_at': DASH, 'renewed_at': DASH, 'released_by': DASH}
    if lock['owner'] is None:
        lease = DASH
    elif lock['held']:
        lease = f'{lock["expires_in"]:.1f} s left'
    else:
        lease = f'expired {-lock["expires_in"]:.1f} s ago'
    return {'owner': lock['owner'] or 'free', 'lease': lease,
            'generation': str(lock['generation']), 'acquired_at': when(lock['acquired_at']),
            'renewed_at': when(lock['renewed_at']), 'released_by': lock['released_by'] or DASH}


def summary_text(document):
    counts = {}
    for entry in document['evolutions']:
        counts[entry['state']] = counts.get(entry['state'], 0) + 1
    states = ', '.join(f'{n} {state}' for state, n in counts.items())
    settled = 'nothing to do' if document['ok'] else 'not settled'
    return f'{len(document["evolutions"])} evolutions: {states} ({settled})'


def failure_key(entry):
    """Changes whenever an entry fails anew: page.js then reloads the traceback it shows."""
    return f'{entry["finished_at"] or ""}|{entry["error"]}' if entry['error'] else ''


# --- the page --------------------------------------------------------------------------------------

def _shorten(traceback):
    if len(traceback) <= TRACEBACK_LIMIT:
        return traceback
    half = TRACEBACK_LIMIT // 2
    return (f'{traceback[:half]}\n\n[... {len(traceback) - 2 * half} characters left out: '
            f'gearbox evolve history ID shows them all ...]\n\n{traceback[-half:]}')


def _forms(entry, forms):
    """One form per action; those not offered for the entry's state are hidden."""
    parts = []
    for action, offer in forms.get(entry['id'], {}).items():
        hidden = '' if offer['token'] else ' hidden'
        parts.append(
            f'<form method="post" action="act" class="action" data-action="{_e(action)}"'
            f' data-states="{_e(" ".join(offer["states"]))}"'
            f'{hidden}><input type="hidden" name="action" value="{_e(action)}">'
            f'<input type="hidden" name="id" value="{_e(entry["id"])}">'
            f'<input type="hidden" name="seen" value="{_e(offer["seen"])}">'
            f'<input type="hidden" name="token" value="{_e(offer["token"])}">'
            f'<button type="submit">{_e(offer["label"])}</button></form>')
    return ''.join(parts)


def _evolution(number, entry, forms, tracebacks):
    progress = entry['progress']
    width = (progress['percent'] or 0) if progress else 0
    ranges = entry['ranges'] if entry['ranges'] and entry['ranges']['total'] else None
    traceback = tracebacks.get(entry['id']) or ''
    return f'''<tbody class="evolution state-{_e(entry["state"])}" data-id="{_e(entry["id"])}">
<tr><td class="number">{number}</td>
<td><code>{_e(entry["id"])}</code><div class="reason" data-field="reason">{_e(entry["reason"])}</div></td>
<td><span class="state" data-field="state">{_e(entry["state"])}</span></td>
<td data-field="attempts">{entry["attempts"]}</td>
<td class="owner" data-field="owner">{_e(entry["owner"] or DASH)}</td>
<td class="time" data-field="started_at">{when(entry["started_at"])}</td>
<td class="time" data-field="finished_at">{when(entry["finished_at"])}</td>
<td class="time" data-field="duration_ms">{duration_text(entry["duration_ms"])}</td>
<td><div class="progress" data-field="progress"{"" if progress else " hidden"}>
<div class="bar"><span style="width:{width}%"></span></div>
<span class="progress-text">{_e(progress_text(progress)) if progress else ""}</span></div>
<div class="ranges" data-field="ranges"{"" if ranges else " hidden"}>{_e(ranges_text(ranges)) if ranges else ""}</div></td>
<td class="actions">{_forms(entry, forms)}</td></tr>
<tr class="failure" data-field="failure"{"" if entry["error"] else " hidden"}><td></td>
<td colspan="9"><div class="error" data-field="error">{_e(entry["error"])}</div>
<details data-key="{_e(failure_key(entry))}"><summary>Traceback</summary><pre>{_e(_shorten(traceback))}</pre></details></td></tr>
</tbody>'''


def _unregistered_row(entry):
    return (f'<tr><td><code>{_e(entry["id"])}</code></td><td><span class="state state-'
            f'{_e(entry["state"])}">{_e(entry["state"])}</span></td><td>{entry["attempts"]}</td>'
            f'<td>{when(entry["finished_at"])}</td><td class="owner">{_e(entry["owner"] or DASH)}'
            f'</td><td>{_e(entry["error"] or DASH)}</td></tr>')


def _lock(lock):
    labels = (('owner', 'Holder'), ('lease', 'Lease'), ('generation', 'Generation'),
              ('acquired_at', 'Acquired'), ('renewed_at', 'Renewed'),
              ('released_by', 'Last released by'))
    fields = lock_fields(lock)
    return ''.join(f'<dt>{label}</dt><dd data-lock="{key}">{_e(fields[key])}</dd>'
                   for key, label in labels)


def content(document, *, forms, tracebacks, actions, refresh_seconds, message=None,
            message_ok=True, error=None):
    """The page itself, as an HTML fragment: what an application's layout template embeds.

    ``forms``: ``{evolution_id: {action: {label, seen, token}}}`` (token empty when the action
    is not offered now); ``tracebacks``: ``{evolution_id: text}``; ``actions``: what page.js
    needs to know of each action (the states it is offered in, its confirmation question).
    """
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    parts = [f'<div id="tgext-evolve" class="tgext-evolve" data-status-url="status.json" '
             f'data-actions-url="actions.json" data-traceback-url="traceback" '
             f'data-refresh="{refresh_seconds:g}" data-actions="{_e(json.dumps(actions))}">',
             f'<style>{_asset("page.css")}</style>']
    summary = summary_text(document) if document else DASH
    parts.append(f'<header><h1>Data evolutions</h1><p class="summary">'
                 f'<span data-field="summary">{_e(summary)}</span> \u00b7 '
                 f'<span data-field="updated">as of {when(now)}</span></p></header>')
    if message:
        kind = 'ok' if message_ok else 'refused'
        parts.append(f'<p class="message message-{kind}" role="status">{_e(message)}</p>')
    parts.append(f'<p class="message message-refused" data-field="error" role="alert"'
                 f'{"" if error else " hidden"}>{_e(error)}</p>')
    if document is not None:
        parts.append(_tables(document, forms, tracebacks))
    parts.append(f'<script>{_asset("page.js")}</script></div>')
    return '\n'.join(parts)


def _tables(document, forms, tracebacks):
    evolutions = ''.join(_evolution(n, entry, forms, tracebacks)
                         for n, entry in enumerate(document['evolutions'], 1))
    unregistered = document['unregistered']
    rows = ''.join(_unregistered_row(entry) for entry in unregistered)
    return f'''<table class="evolutions"><thead><tr><th>#</th><th>Evolution</th><th>State</th>
<th>Attempts</th><th>Owner</th><th>Started</th><th>Finished</th><th>Duration</th>
<th>Progress</th><th></th></tr></thead>
{evolutions}
</table>
<h2>Lock</h2>
<dl class="lock">{_lock(document["lock"])}</dl>
<h2>No longer registered</h2>
<p data-field="no-unregistered"{" hidden" if unregistered else ""}>Every id in the history is registered.</p>
<table class="unregistered"{"" if unregistered else " hidden"}><thead><tr><th>Evolution</th>
<th>State</th><th>Attempts</th><th>Finished</th><th>Owner</th><th>Error</th></tr></thead>
<tbody data-field="unregistered">{rows}</tbody></table>'''


def standalone(title, body):
    """A whole HTML document around :func:`content`: for applications without a layout."""
    return f'''<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{_e(title)}</title></head>
<body class="tgext-evolve-standalone">
{body}
</body></html>
'''
