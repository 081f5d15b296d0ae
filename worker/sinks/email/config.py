"""The operator's SMTP URL -> ``SmtpConfig`` (``ConfigError`` if it is wrong)."""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from worker.errors import ConfigError
from worker.sinks.email.message import CONTROL_RE

TlsMode = Literal["opportunistic", "starttls", "none", "implicit"]
_TLS_MODES: tuple[TlsMode, ...] = ("opportunistic", "starttls", "none", "implicit")
_DEFAULT_PORTS: dict[TlsMode, int] = {
    "opportunistic": 25,
    "starttls": 587,
    "none": 25,
    "implicit": 465,
}
DEFAULT_TIMEOUT = 30.0
_MAX_TIMEOUT = 3600.0

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})$")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_QUERY_KEYS = frozenset({"tls", "cafile", "timeout", "insecure_auth", "helo"})


@dataclass(frozen=True, slots=True, repr=False)
class SmtpConfig:
    """Where and how to connect. ``repr``/``str``/``redacted()`` never show the password."""

    host: str
    port: int
    tls: TlsMode = "opportunistic"
    username: str | None = None
    password: str | None = None
    cafile: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    insecure_auth: bool = False
    helo: str | None = None  # EHLO name; default: this machine's FQDN

    def redacted(self) -> str:
        """The configuration as a URL, with the password replaced by ``***``."""
        scheme = "smtps" if self.tls == "implicit" else "smtp"
        userinfo = ""
        if self.username is not None:
            userinfo = (
                quote(self.username, safe="") + (":***" if self.password is not None else "") + "@"
            )
        host = f"[{self.host}]" if ":" in self.host else self.host
        params: list[str] = []
        if self.tls not in ("opportunistic", "implicit"):
            params.append(f"tls={self.tls}")
        if self.cafile is not None:
            params.append("cafile=" + quote(self.cafile, safe="/"))
        if self.timeout != DEFAULT_TIMEOUT:
            params.append(f"timeout={self.timeout:g}")
        if self.insecure_auth:
            params.append("insecure_auth=1")
        if self.helo is not None:
            params.append(f"helo={self.helo}")
        query = ("?" + "&".join(params)) if params else ""
        return f"{scheme}://{userinfo}{host}:{self.port}{query}"

    def __repr__(self) -> str:
        return f"SmtpConfig({self.redacted()!r})"

    __str__ = redacted


def parse_smtp_url(url: str) -> SmtpConfig:
    """Parse ``smtp[s]://[user:password@]host[:port][?tls=&cafile=&timeout=&insecure_auth=&helo=]``.

    Error messages never echo any part of the URL: a password with an unescaped ``/``, ``#``
    or ``?`` ends up parsed as port, path or query, and would leak through an echo.
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("SMTP URL is empty")
    # `from None` below: a ValueError's text may quote part of the URL (and the password).
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        raise ConfigError("SMTP URL cannot be parsed (unbalanced brackets?)") from None
    if parts.scheme.lower() not in ("smtp", "smtps"):
        raise ConfigError("SMTP URL must start with smtp:// or smtps://")
    scheme = parts.scheme.lower()
    if parts.fragment or "#" in url:
        raise ConfigError(
            "SMTP URL contains '#'; percent-encode it (%23) if it is part of the password"
        )
    try:
        raw_port = parts.port
    except ValueError:
        raise ConfigError(
            "SMTP URL has an invalid port; percent-encode reserved characters such as "
            "/ ? @ : in the user name and password"
        ) from None
    if parts.path not in ("", "/"):
        raise ConfigError(
            "SMTP URL must not have a path; percent-encode '/' (%2F) in the user name or password"
        )
    host = _parse_host(parts.hostname)
    username, password = _parse_userinfo(parts)

    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ConfigError("SMTP URL query string is malformed (expected key=value&...)") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        if key not in _QUERY_KEYS:
            raise ConfigError(
                "SMTP URL has an unknown query parameter; allowed: "
                + ", ".join(sorted(_QUERY_KEYS))
            )
        if key in params:
            raise ConfigError(f"SMTP URL repeats the query parameter {key!r}")
        params[key] = value

    tls = _parse_tls(scheme, params.get("tls"))
    port = raw_port if raw_port is not None else _DEFAULT_PORTS[tls]
    if not 1 <= port <= 65535:
        raise ConfigError("SMTP URL port must be between 1 and 65535")
    timeout = _parse_timeout(params.get("timeout"))
    insecure_auth = _parse_bool("insecure_auth", params.get("insecure_auth"))
    cafile = params.get("cafile")
    if cafile is not None and not cafile:
        raise ConfigError("SMTP URL has an empty cafile=")
    if cafile is not None and tls == "none":
        raise ConfigError("SMTP URL sets cafile= with tls=none; drop one of them")
    helo = params.get("helo")
    if helo is not None and not (_HOSTNAME_RE.match(helo) or _is_ip(helo)):
        raise ConfigError("SMTP URL helo= must be a host name")
    if username is not None and tls == "none" and not insecure_auth:
        raise ConfigError(
            "SMTP URL has credentials with tls=none, which would send the password in clear; "
            "use TLS or add insecure_auth=1"
        )
    return SmtpConfig(
        host=host,
        port=port,
        tls=tls,
        username=username,
        password=password,
        cafile=cafile,
        timeout=timeout,
        insecure_auth=insecure_auth,
        helo=helo,
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _parse_host(hostname: str | None) -> str:
    if not hostname:
        raise ConfigError("SMTP URL has no host")
    if not (_HOSTNAME_RE.match(hostname) or _is_ip(hostname)):
        raise ConfigError("SMTP URL host is not a valid host name or IP address")
    return hostname


def _parse_userinfo(parts: Any) -> tuple[str | None, str | None]:
    if parts.username is None:
        return None, None
    username = unquote(parts.username)
    if not username:
        raise ConfigError("SMTP URL has an empty user name")
    if parts.password is None:
        raise ConfigError("SMTP URL has a user name but no password (user:password@host)")
    password = unquote(parts.password)
    if CONTROL_RE.search(username) or CONTROL_RE.search(password):
        raise ConfigError("SMTP URL user name or password contains control characters")
    return username, password


def _parse_tls(scheme: str, value: str | None) -> TlsMode:
    if scheme == "smtps":
        if value not in (None, "implicit"):
            raise ConfigError("smtps:// is implicit TLS; drop tls= or use smtp://")
        return "implicit"
    if value is None:
        return "opportunistic"
    for mode in _TLS_MODES:
        if value == mode:
            return mode
    raise ConfigError("SMTP URL tls= must be one of: " + ", ".join(_TLS_MODES))


def _parse_timeout(value: str | None) -> float:
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        timeout = float(value)
    except ValueError:
        timeout = math.nan
    if not (math.isfinite(timeout) and 0 < timeout <= _MAX_TIMEOUT):
        raise ConfigError(f"SMTP URL timeout= must be a number of seconds in (0, {_MAX_TIMEOUT:g}]")
    return timeout


def _parse_bool(name: str, value: str | None) -> bool:
    if value is None:
        return False
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigError(f"SMTP URL {name}= must be 1 or 0")
