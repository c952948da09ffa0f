"""The status page's CSRF tokens: signed, bound to a user, an action and a state, short-lived.

A token is ``<issued>.<nonce>.<mac>``: ``mac`` is HMAC-SHA256, under a key derived from the
application's secret, of the user's id, the action, the evolution id, the *state seen* (a digest
of the history record the action was offered for), the time it was issued and a random nonce.
The form carries the state seen beside the token; the server recomputes the MAC (a forged or
altered form fails), refuses tokens older than ``max_age`` (a leaked one does not live long), and
then refuses the action unless the record still is what the form was offered for.

That last check makes every token single-use across the whole cluster, without storing used
tokens anywhere: retrying an evolution changes its record, so the same form sent again (a
replay, a double click, a reload of the result page) names a state that is gone.
"""
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time

log = logging.getLogger('tgext.evolve')

#: How far in the future an issue time may be (hosts' clocks differ by a little).
CLOCK_SKEW = 60.0

#: Application secrets the key is derived from when none is given, in this order.
SECRET_KEYS = ('sa_auth.cookie_secret', 'session.secret', 'beaker.session.secret')

_PURPOSE = b'tgext.evolve status page forms v1'


class TokenRefused(Exception):
    """The form's token is missing, malformed, forged, for someone else, or expired."""


def state_seen(record):
    """A short digest of a history record (None: no record), for a form to name what it saw."""
    if record is None:
        return 'none'
    # With the operator's request: a form sent again after its pause, resume or retry was
    # asked for names a state that is gone.
    fields = [record.state, record.attempts, record.started_at, record.finished_at,
              record.generation, record.requested, record.requested_at]
    return hashlib.sha256(json.dumps(fields).encode('utf-8')).hexdigest()[:16]


def derive_key(config, explicit=None):
    """The signing key: from ``explicit``, else from the first of :data:`SECRET_KEYS` the
    application sets (the same in every process of a cluster), else random to this process."""
    secret = explicit
    if not secret:
        secret = next((config[k] for k in SECRET_KEYS if config.get(k)), None)
    if not secret:
        log.warning('status page: no csrf_secret and none of %s is set: its forms are signed '
                    'with a key of this process only, so a form posted to another process is '
                    'refused', ', '.join(SECRET_KEYS))
        return secrets.token_bytes(32)
    if isinstance(secret, str):
        secret = secret.encode('utf-8')
    # Derived, so that the page never signs with the very key of the auth cookie.
    return hmac.new(secret, _PURPOSE, hashlib.sha256).digest()


class FormTokens:
    """Issues and checks the tokens of one status page."""

    def __init__(self, key, max_age):
        self._key = key
        self.max_age = max_age

    def _mac(self, user, action, evolution_id, seen, issued, nonce):
        message = json.dumps([user, action, evolution_id, seen, issued, nonce]).encode('utf-8')
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b'=').decode('ascii')

    def issue(self, user, action, evolution_id, seen, now=None):
        issued = str(int(time.time() if now is None else now))
        nonce = secrets.token_hex(8)
        return f'{issued}.{nonce}.{self._mac(user, action, evolution_id, seen, issued, nonce)}'

    def check(self, token, user, action, evolution_id, seen, now=None):
        """Raise :class:`TokenRefused` unless ``token`` was issued by :meth:`issue` with these
        very arguments, less than ``max_age`` seconds ago."""
        if not token:
            raise TokenRefused('the form carries no CSRF token')
        parts = token.split('.')
        if len(parts) != 3 or not parts[0].isdigit():
            raise TokenRefused('the form\'s CSRF token is malformed')
        issued, nonce, mac = parts
        expected = self._mac(user, action, evolution_id, seen, issued, nonce)
        if not hmac.compare_digest(expected.encode('ascii'), mac.encode('ascii', 'replace')):
            raise TokenRefused('the form\'s CSRF token is not valid for this user, action and '
                               'evolution (forged or altered)')
        age = (time.time() if now is None else now) - int(issued)
        if age > self.max_age or age < -CLOCK_SKEW:
            raise TokenRefused(f'the form is too old (its CSRF token expires after '
                               f'{self.max_age:g} s)')
