"""A failure's text as stored in the history and as logged: always storable, never huge.

An evolution's exception can say anything: a NUL byte (which PostgreSQL's text types refuse),
a lone surrogate such as ``'\\udcff'`` (which no UTF-8 database accepts), or megabytes (past
MariaDB's ``TEXT`` in strict mode, and a log line nobody can read).  The traceback is kept
readable: what cannot be stored is written as its Python escape, and the middle of a long
text is cut, keeping its head (where it failed) and its tail (the exception).
"""

#: Stored failure texts are at most this many characters (the head and the tail are kept).  At
#: most 4 bytes each in UTF-8: under MariaDB's 65,535-byte ``TEXT`` too.
MAX_STORED_CHARS = 16_000
#: A log line carries at most this many characters of a failure text.
MAX_LOGGED_CHARS = 4_000


def sanitised(text):
    """``text`` with NUL bytes and lone surrogates written as their escapes (``\\x00``,
    ``\\udcff``): storable as UTF-8 in every database."""
    if not isinstance(text, str):
        text = str(text)
    text = text.encode('utf-8', 'backslashreplace').decode('utf-8')
    return text.replace('\x00', '\\x00')


def capped(text, limit):
    """``text`` cut to at most ``limit`` characters, keeping its head and its tail."""
    if len(text) <= limit:
        return text
    marker = '\n[... {} characters cut ...]\n'
    cut = len(text) - limit + len(marker.format(len(text)))
    head = (len(text) - cut) // 2
    return text[:head] + marker.format(cut) + text[head + cut:]


def storable(text):
    """The failure text as recorded in the history."""
    return capped(sanitised(text), MAX_STORED_CHARS)


def plain(text):
    """A last resort for a database that refused :func:`storable`'s text (a ``latin1``
    column...): ASCII only, escapes for the rest."""
    return capped(sanitised(text).encode('ascii', 'backslashreplace').decode('ascii'),
                  MAX_STORED_CHARS)


def loggable(text):
    """The failure text as one log line carries it."""
    return capped(sanitised(text), MAX_LOGGED_CHARS).rstrip()
