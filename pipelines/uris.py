"""URIs as they may be shown, logged or forwarded: never with the credentials some of them carry."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_credentials(uri: str) -> str:
    """`uri` without a user:password@ (or token@) part; anything that is not a URL with a host is returned as is."""
    parts = urlsplit(uri)
    if not parts.netloc or "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
