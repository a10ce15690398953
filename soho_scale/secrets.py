"""The one definition of a secret: what never goes into a spec, a log line, a command line, an
MLflow param or artifact, or a file we write for other nodes.

A secret is the value of an environment variable whose name says so (`is_secret_name`: keys,
tokens, passwords, credentials, sessions, user names of a service) and the user:password part
of any URL. `redact` masks both in text; `has_credentials` tells a value that embeds them.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping

SECRET_NAME = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|SESSION|PRIVATE|USERNAME|API_KEY"
)
MASK = "***"
# user:password@ (or user@) in scheme://user:password@host/... URLs
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_SHORTEST_MASKED = 4  # shorter values ("1", "yes") would mask unrelated text


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name.upper()))


def secret_values(environ: Mapping[str, str] | None = None) -> set[str]:
    """Values of the secret-named variables of `environ` (default: this process's)."""
    environ = os.environ if environ is None else environ
    values = set()
    # Names first, then each value by get(): another thread (MLflow's) may set or delete
    # variables meanwhile, and iterating os.environ's items would then raise KeyError.
    for name in list(environ):
        value = environ.get(name) if is_secret_name(name) else None
        if value and len(value) >= _SHORTEST_MASKED:
            values.add(value)
    return values


def has_credentials(value: str) -> bool:
    """`value` is a URL with a user name or password in it."""
    if "://" not in value:
        return False
    parsed = urllib.parse.urlparse(value)
    return bool(parsed.username or parsed.password)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """`text` with every secret value of `environ` and every URL's user:password masked."""
    for value in sorted(secret_values(environ), key=len, reverse=True):
        text = text.replace(value, MASK)
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
