"""TLS files named by the configuration (the DSN's sslrootcert, sslcert, sslkey, or PGSSL*
in the environment) must be there and readable before anything connects.

asyncpg reports a missing one as a bare ``FileNotFoundError`` without the file's name: an
``OSError``, which `run` would take for an outage and wait on forever. No wait brings the
file back; the operator must: a configuration error, one line naming the file.
"""

from __future__ import annotations

import os
import ssl
from urllib.parse import parse_qs, urlsplit

from worker.errors import ConfigError

# DSN parameter -> the environment variable libpq and asyncpg read when it is absent
_FILES = {"sslrootcert": "PGSSLROOTCERT", "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY"}


def _named_files(dsn: str) -> dict[str, str]:
    try:
        query = parse_qs(urlsplit(dsn).query)
    except ValueError:  # asyncpg says what is wrong with it
        return {}
    mode = (query.get("sslmode") or [os.environ.get("PGSSLMODE", "")])[-1]
    if mode == "disable":  # no TLS: the files are never read
        return {}
    named = {}
    for param, env in _FILES.items():
        value = (query.get(param) or [os.environ.get(env, "")])[-1]
        # "system": the OS's trust store (libpq 16), not a file
        if value and not (param == "sslrootcert" and value == "system"):
            named[param] = value
    return named


def check_tls_files(dsn: str) -> None:
    """Raise ConfigError for a named TLS file that is missing, unreadable or, for the root
    certificate, holds no certificate."""
    for param, path in _named_files(dsn).items():
        where = f"{param} {path!r}"
        expanded = os.path.expanduser(path)
        if not os.path.isfile(expanded):
            what = "is not a file" if os.path.exists(expanded) else "does not exist"
            raise ConfigError(f"{where} (TLS, from the DSN or {_FILES[param]}) {what}")
        try:
            with open(expanded, "rb") as f:
                f.read(1)
            if param == "sslrootcert":
                ssl.create_default_context().load_verify_locations(cafile=expanded)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(f"{where} (TLS) cannot be read: {reason}") from None
