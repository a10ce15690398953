"""The one definition of a secret: what never goes into a spec, a log line, a command line, an
MLflow param or artifact, or a file we write for other nodes.

A secret is the value of an environment variable whose name says so (`is_secret_name`: keys,
tokens, passwords, credentials, sessions, user names of a service), the user:password part of
any URL (`http://user:password@host`), and a query parameter of a URL that is a credential
(presigned S3 URLs' X-Amz-Signature/-Credential/-Security-Token, `token=`, `password=`, ...).
`redact` masks all of them in text; `has_credentials` tells a value that embeds them;
`split_credentials` takes a URL's user:password out (for a client that takes them separately).
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping

from data_pipeline.urls import MASK, URL_USERINFO, mask_url_credentials

SECRET_NAME = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|ACCESS_KEY|SESSION|PRIVATE|USERNAME"
    r"|API_KEY"
)
_SHORTEST_MASKED = 4  # shorter values ("1", "yes") would mask unrelated text


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name.upper()))


def secret_values(environ: Mapping[str, str] | None = None) -> set[str]:
    """Values of the secret-named variables of `environ` (default: this process's), and the
    password of any URL in a variable's value (a library may print it decoded or alone)."""
    environ = os.environ if environ is None else environ
    values = set()
    # Names first, then each value by get(): another thread (MLflow's) may set or delete
    # variables meanwhile, and iterating os.environ's items would then raise KeyError.
    for name in list(environ):
        value = environ.get(name)
        if not value:
            continue
        if is_secret_name(name):
            values.add(value)
        elif "@" in value and "://" in value:
            for match in URL_USERINFO.finditer(value):
                password = match.group("userinfo").partition(":")[2]
                values.update({password, urllib.parse.unquote(password)})
    return {v for v in values if len(v) >= _SHORTEST_MASKED}


def has_credentials(value: str) -> bool:
    """`value` holds a URL with a user name, a password or a credential query parameter."""
    return mask_url_credentials(value) != value


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(`url` without its user:password, the user name, the password), the two unquoted; None
    where the URL has none."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    user, password = parts.username, parts.password
    bare = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    return (
        bare,
        urllib.parse.unquote(user) if user else None,
        urllib.parse.unquote(password) if password is not None else None,
    )


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """`text` with every secret value of `environ`, every URL's user:password and every
    credential query parameter masked."""
    for value in sorted(secret_values(environ), key=len, reverse=True):
        text = text.replace(value, MASK)
    return mask_url_credentials(text)
