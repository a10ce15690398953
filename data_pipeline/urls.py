"""Locations as the system spells them: a local path, or a URL of object storage (`s3://bucket/
prefix`; streaming's writer also takes other clouds' schemes). Every "is this remote?" and
"join this name onto that location" in the house goes through here; so does masking the
credentials a URL can carry (`mask_url_credentials`: data_pipeline's storage messages use it,
soho_scale.secrets builds on it)."""

from __future__ import annotations

import os
import re
import urllib.parse

from data_pipeline.errors import DataError


def is_s3_url(location: str) -> bool:
    return location.startswith("s3://")


def is_remote(location: str) -> bool:
    """Any URL with a scheme other than file (s3://, gs://, ...): not a local path."""
    return urllib.parse.urlparse(location).scheme not in ("", "file")


def split_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise DataError(f"{url}: not an s3://bucket/prefix URL")
    return parsed.netloc, parsed.path.strip("/")


def join_url(base: str, name: str) -> str:
    """Join a folder (local path or s3:// URL) and a relative name."""
    if is_s3_url(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def basename(location: str) -> str:
    """The last part of a local path or URL (`s3://b/run/step_00000004` -> `step_00000004`)."""
    return location.rstrip("/").rsplit("/", 1)[-1]


MASK = "***"
# scheme://user:password@ (or user@): up to the authority's last "@", as URL parsers read it
# (a password may hold an unencoded "@", and RFC 3986's sub-delims ' ( ) ! $ & * + , ; =);
# white space, double quotes, <>, [] and {} end a URL inside other text.
URL_USERINFO = re.compile(
    # (the look-behind starts a scheme only at the start of a word: linear in long words)
    r"(?<![A-Za-z0-9+.-])(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s\"<>\[\]{}]+)@"
)
# ?name=value / &name=value where the name says credential (the value ends at &, #, a space or
# a quote)
# (also in a fragment: OAuth's #access_token=)
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;#](?:X-Amz-(?:Signature|Credential|Security-Token)"
    r"|X-Goog-(?:Signature|Credential)|sig|signature|auth|key|code"
    r"|[A-Za-z0-9_.-]*(?:token|password|passwd|passphrase|secret|api[_-]?key|access[_-]?key"
    r"|credential)[A-Za-z0-9_.-]*)=)(?P<value>[^&#\s\"'<>]+)",
    re.IGNORECASE,
)


def mask_url_credentials(text: str) -> str:
    """`text` with every URL's user:password and credential query values replaced by MASK."""
    text = URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m.group('name')}{MASK}", text)
