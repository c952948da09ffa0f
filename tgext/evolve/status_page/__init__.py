"""The status page: a TurboGears controller the application mounts, reachable behind the gate.

How its requests get past a closed gate without costing anything once it is open: when the
application is built, :func:`mount_prefixes` walks the root controller's attributes (as TG's
own ``mount_point`` does) and the paths of every :class:`EvolveStatusController` found become
the gate state's ``passthrough``.  The gate looks at them only while closed, after deciding to
refuse, so an open gate still costs one attribute check.  Inside TurboGears the controller
answers the users its predicate refuses with the gate's very 503 while the gate is closed, and
with TurboGears' usual denial (401/403) once it is open.
"""
import functools
import json
import threading
import weakref
from typing import Callable, NamedTuple, Optional

import tg
from markupsafe import Markup
from tg import TGController, expose, request
from tg.configuration import milestones
from tg.configuration.utils import TGConfigError
from tg.wsgiapp import TGApp
from webob import Response
from webob.exc import HTTPFound

from ..errors import ConfigurationError
from ..gate import SAFE_METHODS, GateDecision
from ..service import service_for_config

#: How long a button waits for the lock before saying it is held (the runner releases it
#: after a failure, so a retry normally takes it at once).
LOCK_WAIT = 5.0

#: How deep :func:`mount_prefixes` looks below the root controller.
MAX_MOUNT_DEPTH = 6

_EXAMPLE = "EvolveStatusController(allow_only=predicates.has_permission('manage'))"


class Action(NamedTuple):
    """A button of the page: offered while an evolution is in one of ``states``."""
    label: str
    states: tuple
    confirm: str  # the question the browser asks first; ``{id}`` is the evolution id
    run: Callable  # (service, evolution_id, operator) -> message; raises EvolveError
    #: The states it is offered in for one evolution, when they depend on its kind.
    states_for: Optional[Callable] = None

    def offered_states(self, evolution):
        return self.states if self.states_for is None else self.states_for(evolution)


def _retry(service, evolution_id, operator):
    from .. import operations
    from ..status_document import error_summary
    record, = operations.retry(service, [evolution_id], operator=operator, timeout=LOCK_WAIT)
    attempts = f'{record.attempts} attempt{"" if record.attempts == 1 else "s"}'
    return (f'Cleared the failed state of {evolution_id} ({attempts}, last: '
            f'{error_summary(record.error)}): a waiting process runs it again within '
            f'{service.settings.poll_interval:g} s.')


def _gate_note(result):
    if result.blocking:
        return 'It is a blocking evolution: while it is paused the site answers 503.'
    return 'It runs in the background: the site keeps serving while it is paused.'


def _pause(service, evolution_id, operator):
    from .. import operations
    result = operations.pause(service, evolution_id, operator=operator)
    if result.outcome == 'paused':
        said = f'Paused {evolution_id} before it started.'
    else:
        said = (f'Pause of {evolution_id} requested: it stops at its next batch boundary, its '
                f'checkpoint committed.')
    return f'{said} {_gate_note(result)}'


def _resume(service, evolution_id, operator):
    from .. import operations
    result = operations.resume(service, evolution_id, operator=operator)
    done = result.record.progress_done
    where = f' from its checkpoint ({done} items done)' if result.record.checkpoint else ''
    return (f'Resume of {evolution_id} requested: the process holding the lock continues '
            f'it{where} within {service.settings.poll_interval:g} s.')


def _pausable_states(evolution):
    from ..evolution import BatchEvolution
    # A plain evolution runs in one transaction: it can only be paused before it starts.
    return ('pending', 'running') if isinstance(evolution, BatchEvolution) else ('pending',)


#: Every button, by the action name its form posts.
ACTIONS = {
    'retry': Action('Retry', ('failed',),
                    'Retry evolution {id}? Its failed state is cleared and it runs again.',
                    _retry),
    'pause': Action('Pause', ('pending', 'running'),
                    'Pause evolution {id}? It stops at its next batch boundary (a blocking '
                    'one keeps the site answering 503 until it is resumed).',
                    _pause, _pausable_states),
    'resume': Action('Resume', ('paused',),
                     'Resume evolution {id}? It continues from its checkpoint.', _resume),
}


class _Refused(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def _check_predicate(allow_only):
    if allow_only is None:
        raise ConfigurationError(
            f'EvolveStatusController needs allow_only, the predicate of the users who may see '
            f'and steer the evolutions, e.g. {_EXAMPLE}')
    predicate = getattr(allow_only, 'predicate', allow_only)  # a full requirement, or a predicate
    if not callable(getattr(predicate, 'is_met', None)):
        raise ConfigurationError(
            f'EvolveStatusController: allow_only={allow_only!r} is not a TurboGears predicate '
            f'(from tg import predicates), e.g. {_EXAMPLE}')
    return allow_only


def _check_template(template):
    if template is None:
        return None
    engine, _, name = template.partition(':') if isinstance(template, str) else ('', '', '')
    if not engine or not name:
        raise ConfigurationError(
            f'EvolveStatusController: template={template!r} must be "engine:dotted.name", '
            f'e.g. "kajiki:myapp.templates.evolve_status"')
    return engine, name


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(
            f'EvolveStatusController: {name}={value!r} must be a number of seconds > 0')
    return value


def _json(document, status=200):
    response = Response(json.dumps(document), status=status, charset='utf-8',
                        content_type='application/json')
    return _private(response)


def _private(response):
    response.headers['Cache-Control'] = 'no-store'
    response.headers['X-Content-Type-Options'] = 'nosniff'
    response.headers['X-Frame-Options'] = 'DENY'  # no clicking its buttons through a frame
    return response


class EvolveStatusController(TGController):
    """Every evolution, the lock and the history, live, with retry, pause and resume buttons.

    Mount it in the root controller, the way quickstart mounts tgext.admin::

        evolve = EvolveStatusController(allow_only=predicates.has_permission('manage'))

    ``allow_only`` (required): who may see the page and use its buttons.  ``template``: an
    ``"engine:dotted.name"`` of the application's renderers that puts the page in the site's
    layout; it gets ``title``, ``content`` (the page, as markup) and ``status`` (the status
    document, None when it cannot be read).  Without it the page is a small standalone
    document.  ``refresh_seconds``: how often the page polls ``status.json``.
    ``csrf_secret``: the key its forms are signed with (default: derived from
    ``sa_auth.cookie_secret``); ``csrf_max_age``: how long a form stays valid, in seconds.
    """

    def __init__(self, allow_only=None, *, template=None, refresh_seconds=2.0,
                 csrf_secret=None, csrf_max_age=900, title='Data evolutions'):
        super().__init__()
        self.allow_only = _check_predicate(allow_only)
        self.template = _check_template(template)
        self.refresh_seconds = _positive('refresh_seconds', refresh_seconds)
        self.csrf_max_age = _positive('csrf_max_age', csrf_max_age)
        self.csrf_secret = csrf_secret
        self.title = title
        self._tokens = weakref.WeakKeyDictionary()  # EvolveService -> FormTokens
        self._tokens_guard = threading.Lock()

    # --- who may come in -----------------------------------------------------------------------

    def _check_security(self):
        environ = request.environ
        service = service_for_config(tg.config)
        if service is not None and _gate_refuses(service, environ):
            predicate = getattr(self.allow_only, 'predicate', self.allow_only)
            if not predicate.is_met(environ):
                # Exactly what the gate answers everyone else: the page is not even there.
                # (TurboGears would add the headers of its own response, e.g. Pragma.)
                tg.response.headers.clear()
                raise GateDecision(service).response(environ)
        return super()._check_security()

    def _before(self, *args, **kwargs):
        # Our 4xx/503 carry the page's message: not the application's error page.
        request.disable_error_pages()

    def check_config(self, config):
        """Start-up checks against the application's configuration (see mount_prefixes)."""
        if self.template is not None:
            renderers = list(config.get('renderers') or ())
            if self.template[0] not in renderers:
                raise ConfigurationError(
                    f'EvolveStatusController: template {":".join(self.template)!r} needs the '
                    f'{self.template[0]!r} renderer, which the application does not enable '
                    f'(renderers: {renderers}); add it to "renderers" in config/app_cfg.py')

    # --- pages ---------------------------------------------------------------------------------

    @expose()
    def index(self, **ignored):
        path = request.path
        if not path.endswith('/') and not path.endswith('/index'):
            # The page's links are relative to the page.
            query = f'?{request.query_string}' if request.query_string else ''
            raise HTTPFound(location=f'{path}/{query}')
        return self._page()

    @expose()
    def status(self, **ignored):
        """``status.json``: the status document, as ``gearbox evolve status --json`` prints it."""
        service, status, problem = self._read()
        if problem is not None:
            return _json({'error': problem}, 503)
        from ..status_document import status_document
        return _json(status_document(status))

    status_json = status  # the same URL when the application disables request extensions

    @expose()
    def actions(self, **ignored):
        """``actions.json``: a fresh token for every button the page may show now."""
        service, status, problem = self._read()
        if problem is not None:
            return _json({'error': problem}, 503)
        offered = {name: {} for name in ACTIONS}
        for evolution_id, offers in self._offers(service, status).items():
            for name, offer in offers.items():
                if offer['token']:
                    offered[name][evolution_id] = {'seen': offer['seen'],
                                                   'token': offer['token']}
        return _json({'actions': offered})

    actions_json = actions

    @expose()
    def traceback(self, id=None, **ignored):
        """The traceback of an evolution's failure, as text (the page loads it on demand)."""
        service, status, problem = self._read()
        if problem is not None:
            return _private(Response(problem, status=503, content_type='text/plain',
                                     charset='utf-8'))
        from .. import operations
        records = {record.evolution_id: record for record, _ in operations.history(service)}
        record = records.get(id)
        if record is None:
            return _private(Response(f'nothing recorded for {id!r}', status=404,
                                     content_type='text/plain', charset='utf-8'))
        from .render import _shorten
        return _private(Response(_shorten(record.error or ''), content_type='text/plain',
                                 charset='utf-8'))

    @expose(allowed_methods=['POST'])
    def act(self, action=None, id=None, seen=None, token=None, **ignored):
        """What the buttons post: ``action``, ``id``, ``seen`` (the state the button was
        offered for) and ``token``.  The page again, with what happened."""
        try:
            message = self._act(action, id, seen, token)
        except _Refused as refused:
            return self._page(f'Nothing was changed: {refused}', ok=False,
                              status=refused.status)
        return self._page(message)

    def _act(self, action_name, evolution_id, seen, token):
        from ..errors import EvolveError
        from .csrf import TokenRefused, state_seen
        if not token:
            raise _Refused(403, 'the form carries no CSRF token; use the buttons of this page')
        action = ACTIONS.get(action_name)
        if action is None:
            raise _Refused(400, f'there is no action {action_name!r} (the page offers: '
                                f'{", ".join(ACTIONS)})')
        user = _user()
        service = service_for_config(tg.config)
        if service is None:
            raise _Refused(503, self._read()[2])
        try:
            self._form_tokens(service).check(token, user, action_name, evolution_id, seen)
        except TokenRefused as e:
            raise _Refused(403, f'{e}; reload the page and try again') from None
        service, status, problem = self._read()
        if problem is not None:
            raise _Refused(503, problem)
        current = {e.evolution_id: e for e in status.evolutions}.get(evolution_id)
        if current is None:
            raise _Refused(404, f'no registered evolution has the id {evolution_id!r}')
        if current.state not in action.states:
            raise _Refused(409, f'{evolution_id} is {current.state}; {action_name} is only '
                                f'possible while it is {" or ".join(action.states)}')
        if state_seen(current.record) != seen:
            raise _Refused(409, f'{evolution_id} changed since this page showed it (this form '
                                f'was already used, or it failed again); check it and confirm '
                                f'again')
        operator = f'{user or "anonymous"} via the status page'
        try:
            return action.run(service, evolution_id, operator)
        except EvolveError as e:  # refused under the lock, or the lock stayed busy
            said = str(e)  # the CLI's wording: the page says which verb without the prefix
            raise _Refused(409, said.removeprefix(f'{action_name}: ')) from None
        except Exception as e:
            raise _Refused(503, _problem_text(e)) from None

    # --- helpers -------------------------------------------------------------------------------

    def _read(self):
        """``(service, status, problem)``: the current status, or why it cannot be read."""
        service = service_for_config(tg.config)
        if service is None:
            return None, None, ('tgext.evolve does not run in this application '
                                '(tgext.evolve.enabled = false, or it is not plugged in)')
        from .. import operations
        try:
            return service, operations.status(service), None
        except ConfigurationError as e:
            return service, None, str(e)
        except Exception as e:  # the operators' page says why; the public 503 never does
            return service, None, _problem_text(e)

    def _form_tokens(self, service):
        with self._tokens_guard:
            tokens = self._tokens.get(service)
            if tokens is None:
                from .csrf import FormTokens, derive_key
                tokens = FormTokens(derive_key(service.config, self.csrf_secret),
                                    self.csrf_max_age)
                self._tokens[service] = tokens
            return tokens

    def _offers(self, service, status):
        """``{evolution_id: {action: {label, seen, token}}}``, a token where it is offered."""
        from .csrf import state_seen
        tokens, user = self._form_tokens(service), _user()
        registered = {e.evolution_id: e for e in service.evolutions}
        offers = {}
        for evolution in status.evolutions:
            seen = state_seen(evolution.record)
            offers[evolution.evolution_id] = offer = {}
            for name, action in ACTIONS.items():
                states = action.offered_states(registered[evolution.evolution_id])
                offer[name] = {
                    'label': action.label, 'seen': seen, 'states': states,
                    'token': (tokens.issue(user, name, evolution.evolution_id, seen)
                              if evolution.state in states else '')}
        return offers

    def _page(self, message=None, ok=True, status=200):
        from . import render
        service, current, problem = self._read()
        document = offers = None
        tracebacks = {}
        if current is not None:
            from ..status_document import status_document
            document = status_document(current)
            offers = self._offers(service, current)
            tracebacks = {e.evolution_id: e.record.error for e in current.evolutions
                          if e.record is not None and e.record.error}
        content = render.content(
            document, forms=offers or {}, tracebacks=tracebacks, actions=_actions_for_js(),
            refresh_seconds=self.refresh_seconds, message=message, message_ok=ok,
            error=problem)
        if self.template is None:
            body = render.standalone(self.title, content)
        else:
            engine, name = self.template
            # What the layout may read (a quickstarted master shows response.charset).
            tg.response.headers['Content-Type'] = 'text/html; charset=utf-8'
            body = str(tg.render_template(
                {'title': self.title, 'content': Markup(content), 'status': document},
                engine, name))
        if problem is not None and status == 200:
            status = 503
        return _private(Response(body, status=status, content_type='text/html',
                                 charset='utf-8'))


@functools.lru_cache(maxsize=None)
def _actions_for_js():
    return {name: {'states': list(a.states), 'confirm': a.confirm} for name, a in ACTIONS.items()}


def _gate_refuses(service, environ):
    """Whether the gate, closed, would answer this request 503 were it not the page's."""
    if service.state.open:
        return False
    return not (service.settings.readonly and environ.get('REQUEST_METHOD') in SAFE_METHODS)


def _user():
    identity = request.environ.get('repoze.who.identity') or {}
    return identity.get('repoze.who.userid')


def _problem_text(error):
    first_line = (str(error).strip().splitlines() or [''])[0][:300]
    return f'cannot read or write the evolutions\' state: {type(error).__name__}: {first_line}'


# TurboGears resolves @expose at its renderers_ready milestone, which test suites reset between
# applications; a reset after this class was defined would leave every URL of the page a 404.
for _method in (EvolveStatusController.index, EvolveStatusController.status,
                EvolveStatusController.actions, EvolveStatusController.traceback,
                EvolveStatusController.act):
    milestones.renderers_ready.register(_method.decoration._resolve_expositions,
                                        persist_on_reset=True)
del _method


# --- where the page is mounted ----------------------------------------------------------------------

def mount_prefixes(config):
    """``('/evolve/', ...)``: the path of every :class:`EvolveStatusController` reachable by
    attributes from the application's root controller, with a trailing slash.

    Called when the application is built, so the root controller module is imported then
    (TurboGears would import it at the first request).  Each page found checks its options
    against the configuration: a template engine the app lacks is a start-up error.
    """
    root = config.get('tg.root_controller')
    if root is None:
        try:
            root = TGApp.lookup_controller(config, 'root')
        except (TGConfigError, KeyError):  # no controllers package: nothing can be mounted
            return ()
    found = []
    _walk(root, '', found, set(), 0)
    for _, page in found:
        page.check_config(config)
    return tuple(f'{path}/' for path, _ in found)


def _walk(node, path, found, seen, depth):
    if id(node) in seen or depth > MAX_MOUNT_DEPTH:
        return
    seen.add(id(node))
    for name in dir(node):
        if name.startswith('_') or name in ('mount_point', 'mount_steps'):
            continue
        try:
            child = getattr(node, name)
        except Exception:  # a property that needs a request
            continue
        if isinstance(child, EvolveStatusController):
            found.append((f'{path}/{name}', child))
        elif not isinstance(child, type) and hasattr(child, '_dispatch'):
            _walk(child, f'{path}/{name}', found, seen, depth + 1)
