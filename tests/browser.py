"""A real browser and a real server for the status page's tests.

:class:`Browser` drives Debian's headless Chromium through its chromedriver with the W3C
WebDriver protocol, in a few dozen lines over ``urllib``: the tests need a dozen endpoints
(navigate, find, click, type, run a script, answer a confirm(), take a screenshot), and a
client of our own never downloads a driver or a browser, never phones home, and needs no
package.  :class:`Server` serves a WSGI application on a free loopback port, one thread per
request, as a threaded production server would.
"""
import base64
import json
import os
import socket
import socketserver
import subprocess
import threading
import urllib.error
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

import polling

CHROMIUM = os.environ.get('TGEXT_EVOLVE_TEST_CHROMIUM', '/usr/bin/chromium')
CHROMEDRIVER = os.environ.get('TGEXT_EVOLVE_TEST_CHROMEDRIVER', '/usr/bin/chromedriver')

#: Running as root in a container with the network closed: no sandbox, no GPU, and nothing
#: that reaches out (component updates, sync, QUIC, background requests).
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
                 '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage',
                 '--no-default-browser-check', '--window-size=1280,1000']

#: How long one WebDriver command may take on a loaded machine.
COMMAND_TIMEOUT = 60
ELEMENT = 'element-6066-11e4-a52e-4f735466cecf'  # the W3C key of an element reference

# No proxy, whatever the environment says: everything here is on 127.0.0.1.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def require_chromium():
    """Fail (not skip) with the command that installs what is missing."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f'{" and ".join(missing)} not found: the browser tests run Debian\'s '
                    f'Chromium.  Install it with: apt-get install chromium chromium-driver '
                    f'(.ci/run does), or point TGEXT_EVOLVE_TEST_CHROMIUM and '
                    f'TGEXT_EVOLVE_TEST_CHROMEDRIVER at them', pytrace=False)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class WebDriverError(Exception):
    def __init__(self, error, message):
        super().__init__(f'{error}: {message}')
        self.error = error


class Browser:
    """One Chromium session, with a fresh profile in ``workdir``."""

    def __init__(self, workdir, timeout=30):
        self.timeout = timeout
        port = free_port()
        self.log_path = workdir / 'chromedriver.log'
        with open(self.log_path, 'wb') as log:
            self._driver = subprocess.Popen([CHROMEDRIVER, f'--port={port}'], stdout=log,
                                            stderr=subprocess.STDOUT)
        self._base = f'http://127.0.0.1:{port}'
        polling.wait_until(self._driver_ready, 'chromedriver listening', timeout)
        options = {'binary': CHROMIUM,
                   'args': [*CHROMIUM_ARGS, f'--user-data-dir={workdir / "profile"}']}
        capabilities = {'browserName': 'chrome', 'goog:chromeOptions': options,
                        'unhandledPromptBehavior': 'ignore'}
        try:
            created = self._call('POST', '/session', {'capabilities': {'alwaysMatch':
                                                                       capabilities}})
        except Exception:
            self._driver.kill()
            raise
        self._session = f'/session/{created["sessionId"]}'

    def _driver_ready(self):
        if self._driver.poll() is not None:
            raise AssertionError(f'chromedriver exited: {self.log_path.read_text()}')
        try:
            return self._call('GET', '/status')['ready']
        except (OSError, WebDriverError):
            return False

    def _call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode('utf-8')
        request = urllib.request.Request(self._base + path, data=data, method=method,
                                         headers={'Content-Type': 'application/json'})
        try:
            with _direct.open(request, timeout=COMMAND_TIMEOUT) as response:
                return json.loads(response.read())['value']
        except urllib.error.HTTPError as e:
            value = json.loads(e.read() or b'{}').get('value', {})
            raise WebDriverError(value.get('error', e.code), value.get('message', '')) from None

    def command(self, method, path, body=None):
        return self._call(method, self._session + path, body)

    # --- what a test does ---------------------------------------------------------------------

    def get(self, url):
        self.command('POST', '/url', {'url': url})

    def back(self):
        self.command('POST', '/back', {})

    @property
    def url(self):
        return self.command('GET', '/url')

    @property
    def source(self):
        return self.command('GET', '/source')

    def find(self, css):
        return self.command('POST', '/element', {'using': 'css selector', 'value': css})[ELEMENT]

    def text(self, css):
        """The rendered text of the first element ``css`` selects ('' when hidden)."""
        return self.command('GET', f'/element/{self.find(css)}/text')

    def click(self, css):
        self.command('POST', f'/element/{self.find(css)}/click', {})

    def type(self, css, text):
        self.command('POST', f'/element/{self.find(css)}/value', {'text': text})

    def run(self, script, *args):
        """Run ``script`` (a function body) in the page and return its value."""
        return self.command('POST', '/execute/sync', {'script': script, 'args': list(args)})

    def alert_text(self):
        return self.command('GET', '/alert/text')

    def accept_alert(self):
        self.command('POST', '/alert/accept', {})

    def screenshot(self):
        return base64.b64decode(self.command('GET', '/screenshot'))

    def delete_cookies(self):
        self.command('DELETE', '/cookie')

    def wait_for(self, condition, what, timeout=None):
        """Poll ``condition()`` until truthy; an element not (or no longer) there is a no."""
        def attempt():
            try:
                return condition()
            except WebDriverError as e:
                if e.error in ('no such element', 'stale element reference', 'no such alert'):
                    return False
                if 'does not belong to the document' in str(e):
                    return False  # read while a form's answer replaced the page: look again
                raise
        return polling.wait_until(attempt, what, timeout or self.timeout, 0.05)

    def quit(self):
        try:
            self._call('DELETE', self._session)
        finally:
            self._driver.terminate()
            try:
                self._driver.wait(10)
            except subprocess.TimeoutExpired:
                self._driver.kill()
                self._driver.wait()


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # one line per request would flood the test output
        pass


class Server:
    """``wsgi_app`` served on a free 127.0.0.1 port until :meth:`close`."""

    def __init__(self, wsgi_app):
        self._server = make_server('127.0.0.1', 0, wsgi_app, server_class=_ThreadingServer,
                                   handler_class=_QuietHandler)
        self.url = f'http://127.0.0.1:{self._server.server_port}'
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={'poll_interval': 0.05}, daemon=True)
        self._thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
