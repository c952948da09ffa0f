"""The 503 gate: in front of the application until this process may serve.

Two forms share one decision:

* :class:`MaintenanceMiddleware`, a plain WSGI middleware around the whole TG application: the
  default, because a 503 from here costs a few hundred Python opcodes instead of the thousands a
  trip through TG's wrapper chain costs.
* :class:`MaintenanceApplicationWrapper`, a TG application wrapper, used instead when the
  application renders 503 with its own ErrorController (503 listed in
  ``errorpage.status_codes``).

Once the state is open a request costs one attribute check; the gate never queries the
database.  Neither form knows anything about evolutions: a 503 never names one.
"""
import json

from webob.exc import HTTPServiceUnavailable

from tg.appwrappers.base import ApplicationWrapper

from .service import service_for_config
from .state import STARTING

SAFE_METHODS = frozenset(('GET', 'HEAD', 'OPTIONS'))

#: What a 503 says (a page of the application's ErrorController shows it as ``detail``).
MESSAGE = 'Upgrading, back in a moment'

#: How long a request that arrives before the first database read waits for it.
FIRST_LOOK_TIMEOUT = 5.0

_HTML = '''<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{retry_after}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Upgrading, back in a moment</title>
<style>body{{font-family:system-ui,sans-serif;max-width:32em;margin:15vh auto;padding:0 1em;
color:#333;text-align:center}}h1{{font-weight:400}}</style></head>
<body><h1>Upgrading, back in a moment</h1>
<p>This site is being upgraded. This page reloads by itself in {retry_after} seconds.</p>
</body></html>
'''


def wants_json(environ):
    """True when the client prefers JSON to HTML (API clients, fetch())."""
    accept = environ.get('HTTP_ACCEPT', '')
    if 'json' not in accept:
        return False
    json_at = accept.find('json')
    html_at = accept.find('text/html')
    return html_at < 0 or json_at < html_at


class GateDecision:
    """Whether a request may pass while the state is closed, and the 503 it gets otherwise."""

    def __init__(self, service):
        self.service = service
        self.state = service.state
        settings = service.settings
        self.readonly = settings.readonly
        self.retry_after = str(settings.retry_after)
        self.html = _HTML.format(retry_after=settings.retry_after).encode('utf-8')
        self.headers = [('Retry-After', self.retry_after), ('Cache-Control', 'no-store')]

    def may_pass(self, environ):
        """Called only while closed: restart after a fork, wait for the first look, readonly."""
        self.service.ensure_running()
        state = self.state
        if not state.open and state.phase == STARTING:
            state.wait_first_look(FIRST_LOOK_TIMEOUT)
        if state.open:
            return True
        if self.readonly and environ.get('REQUEST_METHOD') in SAFE_METHODS:
            return True
        # The status page: it checks its own predicate, and answers the others with
        # response() below.  '/evolve' + '/' matches '/evolve/', '/evolvefoo/' does not.
        if state.passthrough:
            return (environ.get('PATH_INFO', '') + '/').startswith(state.passthrough)
        return False

    def body(self, environ):
        if wants_json(environ):
            payload = {'status': 503, 'message': MESSAGE,
                       'retry_after': int(self.retry_after)}
            progress, eta = self.state.progress, self.state.eta
            if progress is not None:
                payload['progress'] = round(progress, 1)
            if eta is not None:
                payload['eta_seconds'] = round(eta)
            return 'application/json', json.dumps(payload).encode('utf-8')
        return 'text/html; charset=utf-8', self.html

    def response(self, environ):
        """The 503 this gate answers, as an exception a controller raises: for a request
        the gate let through that must get what everyone else gets (see may_pass).

        With the application's ErrorController rendering the 503, a client that asks for
        JSON still gets the JSON body (ErrorPage re-renders only HTML responses); the others
        get an exception whose ``Retry-After`` header the ErrorController can read to refresh
        its page after that many seconds."""
        if self.service.renders_error_page and not wants_json(environ):
            return HTTPServiceUnavailable(detail=MESSAGE, headers=dict(self.headers))
        content_type, body = self.body(environ)
        return HTTPServiceUnavailable(body=body, headerlist=[
            ('Content-Type', content_type), ('Content-Length', str(len(body))), *self.headers])


class MaintenanceMiddleware:
    """WSGI middleware answering a cheap 503 until the state opens."""

    def __init__(self, app, service):
        self.app = app
        self.state = service.state
        self.decision = GateDecision(service)

    def __call__(self, environ, start_response):
        if self.state.open:
            return self.app(environ, start_response)
        if self.decision.may_pass(environ):
            return self.app(environ, start_response)
        content_type, body = self.decision.body(environ)
        start_response('503 Service Unavailable', [
            ('Content-Type', content_type), ('Content-Length', str(len(body))),
            *self.decision.headers])
        if environ.get('REQUEST_METHOD') == 'HEAD':
            return [b'']
        return [body]


class MaintenanceApplicationWrapper(ApplicationWrapper):
    """The same gate inside TG, so that ErrorPageApplicationWrapper can render the 503.

    Injected only when the application lists 503 in ``errorpage.status_codes``; the
    middleware is not installed then.
    """

    def __init__(self, handler, config):
        super().__init__(handler, config)
        self.service = service_for_config(config)
        self._injected = self.service is not None and self.service.renders_error_page
        if self._injected:
            self.state = self.service.state
            self.decision = GateDecision(self.service)

    @property
    def injected(self):
        return self._injected

    def __call__(self, controller, environ, context):
        if self.state.open:
            return self.next_handler(controller, environ, context)
        if 'tg.original_response' in environ:
            # ErrorPage re-dispatches error responses to the ErrorController: let it render.
            # On our 503 put back the Retry-After it dropped with the original response (in
            # readonly mode a GET's 404 comes back this way too, and must not get one).
            response = self.next_handler(controller, environ, context)
            if environ['tg.original_response'].status_int == 503:
                # TurboGears' own Cache-Control (no-cache) would let a cache keep the page.
                response.headers.update(self.decision.headers)
            return response
        if self.decision.may_pass(environ):
            return self.next_handler(controller, environ, context)
        if wants_json(environ):
            # Even where errorpage.content_types lists JSON: the body is the gate's own.
            context.request.state['status_code_redirect'] = False
        # Returned, not raised: a raised HTTPServiceUnavailable escapes ErrorPage.
        return self.decision.response(environ)
