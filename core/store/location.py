"""Where the store is: ``LAMBDA_MATRIX_DB`` is a file path (SQLite) or a ``postgresql://`` URL.
A URL is shown only through ``redact_url``: its password never reaches a log line, an error
or a report."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
HIDDEN = "***"


def is_postgres_url(location: str) -> bool:
    return location.strip().lower().startswith(POSTGRES_SCHEMES)


def redact_url(url: str) -> str:
    """The URL with its password (in the netloc, or a ``password=`` query parameter) shown as
    ``***``; anything that is not a URL comes back unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return HIDDEN if "@" in url else url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{HIDDEN}@{hosts}" if colon else f"{user}@{hosts}"
    query = "&".join(
        f"{name}={HIDDEN}" if name.lower() == "password" else pair
        for pair in parts.query.split("&")
        if pair
        for name in [pair.partition("=")[0]]
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's error message, say) with the URL's password taken out, should it
    quote the URL."""
    try:
        secret = urlsplit(url).password
    except ValueError:
        secret = None
    text = text.replace(url, redact_url(url))
    for form in {secret, unquote(secret)} if secret else ():
        text = text.replace(form, HIDDEN)
    return text
