"""The ``webhook`` kind: an HTTP request with a JSON body to a URL from the payload.

Payload::

    {"url": "https://api.example.com/hooks/orders", "method": "POST",
     "body": {...any JSON...}, "headers": {"Authorization": "Bearer ..."}}

Every request carries ``Idempotency-Key`` (stable across retries of one intent), the intent's
W3C trace context (``traceparent``, ``tracestate``) if it has one, and, when a secret is
configured, ``Outbox-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of
"<t>.<body>">``. 2xx is sent; 408, 425, 429, 5xx and network errors are transient (a
``Retry-After`` is honoured); any other status is permanent. Redirects are not followed: a
redirect could leave the allow-list, and a POST should go to the URL that was meant.
Loopback, private and link-local destinations are refused unless allowed
(worker/sinks/webhook/guard.py).

Error messages name the scheme, host and port only: webhook URLs often carry a token in
their path or query (Slack, Teams, Zapier) and ``last_error`` is stored and logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson
from yarl import URL

from worker.errors import ConfigError, PermanentError, TransientError
from worker.intent import Intent
from worker.observe.tracing import with_trace_context
from worker.sinks.size import WEBHOOK_DEFAULT, SizeLimit
from worker.sinks.webhook.guard import DestinationPolicy, DestinationRefused, GuardedConnector

__all__ = [
    "SIGNATURE_HEADER",
    "WebhookRequest",
    "WebhookSink",
    "build_request",
    "host_allowed",
    "parse_allow_hosts",
    "parse_retry_after",
    "sign",
]

SIGNATURE_HEADER = "Outbox-Signature"
_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_FIELDS = frozenset({"url", "method", "body", "headers"})
# Headers this sink sets, or that belong to the HTTP framing: a payload may not set them.
_OWNED_HEADERS = frozenset(
    {
        "idempotency-key", SIGNATURE_HEADER.lower(), "content-type", "content-length", "host",
        "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "trailer",
        "expect", "proxy-authorization", "proxy-connection",
    }
)  # fmt: skip
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$")  # RFC 9110 field-name
_VALUE_BAD_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HOST_PATTERN_RE = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
_TRANSIENT_STATUS = frozenset({408, 425, 429})
_MAX_EXCERPT = 200
_READ_CHUNK = 16384
_MAX_BODY_READ = 256 * 1024


# ---------------------------------------------------------------------------------------------
# Configuration and the request (pure)
# ---------------------------------------------------------------------------------------------


def parse_allow_hosts(text: str | None) -> tuple[str, ...]:
    """``"api.example.com, *.hooks.example.net"`` -> normalised patterns; empty: any host."""
    patterns = []
    for item in (text or "").split(","):
        pattern = item.strip().lower().rstrip(".")
        if not pattern:
            continue
        if not _HOST_PATTERN_RE.match(pattern):
            raise ConfigError(
                f"--webhook-allow-hosts: {item.strip()!r} is not a host name or *.domain "
                "(no scheme, port or path)"
            )
        patterns.append(pattern)
    return tuple(patterns)


def host_allowed(host: str, patterns: Sequence[str]) -> bool:
    """Exact host names, or ``*.example.com`` for any subdomain (not example.com itself)."""
    if not patterns:
        return True
    host = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    method: str
    url: URL
    body: bytes | None
    headers: dict[str, str]

    @property
    def target(self) -> str:
        """Scheme, host and port: safe to log (no path, query or credentials)."""
        return f"{self.url.scheme}://{self.url.host}:{self.url.port}"


def _excerpt(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_url(raw: object, allow_hosts: Sequence[str]) -> URL:
    if not isinstance(raw, str) or not raw:
        raise PermanentError("webhook payload needs 'url', a non-empty string")
    try:
        url = URL(raw)
    except (ValueError, TypeError):
        raise PermanentError("webhook url cannot be parsed") from None
    if url.scheme not in ("http", "https"):
        raise PermanentError("webhook url must be http:// or https://")
    if not url.host:
        raise PermanentError("webhook url has no host")
    if url.user is not None or url.password is not None:
        raise PermanentError(
            "webhook url must not contain credentials; send them in 'headers' instead"
        )
    if url.fragment:
        raise PermanentError("webhook url must not have a #fragment")
    if not host_allowed(url.host, allow_hosts):
        raise PermanentError(f"webhook host {url.host!r} is not in --webhook-allow-hosts")
    return url


def _parse_headers(raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PermanentError("webhook 'headers' must be an object of name -> string")
    headers: dict[str, str] = {}
    for name, value in raw.items():
        if not _TOKEN_RE.match(name):
            raise PermanentError(f"webhook header name {_excerpt(name)} is not a valid token")
        if name.lower() in _OWNED_HEADERS:
            raise PermanentError(f"webhook header {name!r} is set by the worker, not the payload")
        if not isinstance(value, str):
            raise PermanentError(f"webhook header {name!r} must be a string")
        if _VALUE_BAD_RE.search(value):
            raise PermanentError(f"webhook header {name!r} contains a line break or control char")
        headers[name] = value
    return headers


def build_request(intent: Intent, allow_hosts: Sequence[str] = ()) -> WebhookRequest:
    """Validate the payload; raise ``PermanentError`` for anything that cannot be sent."""
    payload = intent.payload
    if not isinstance(payload, dict):
        raise PermanentError(f"webhook payload must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(str(k) for k in payload if k not in _FIELDS)
    if unknown:
        raise PermanentError("webhook payload has unknown field(s): " + ", ".join(unknown))
    url = _parse_url(payload.get("url"), allow_hosts)
    method = payload.get("method", "POST")
    if not isinstance(method, str) or method.upper() not in _METHODS:
        raise PermanentError(
            f"webhook method {_excerpt(method)} is not one of {', '.join(sorted(_METHODS))}"
        )
    headers = _parse_headers(payload.get("headers"))
    body = None
    if "body" in payload:
        body = orjson.dumps(payload["body"])
        headers["Content-Type"] = "application/json"
    return WebhookRequest(method.upper(), url, body, headers)


def sign(secret: str, timestamp: int, body: bytes | None) -> str:
    """The ``Outbox-Signature`` value: ``t=<timestamp>,v1=<hex HMAC-SHA256>`` over
    ``b"<timestamp>." + body`` (an empty body when there is none)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + (body or b""), hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


async def _read_head(response: aiohttp.ClientResponse) -> bytes:
    """The first bytes of the body, for the error message. A body read to its end lets the
    connection go back to the pool; a longer one is cut off and its connection closed."""
    head = bytearray()
    async for chunk in response.content.iter_chunked(_READ_CHUNK):
        head += chunk
        if len(head) >= _MAX_BODY_READ:
            break
    return bytes(head[:_MAX_BODY_READ])


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_EXCERPT else text[: _MAX_EXCERPT - 3] + "..."


# ---------------------------------------------------------------------------------------------
# The sink
# ---------------------------------------------------------------------------------------------


class WebhookSink:
    """Sends ``webhook`` intents over one pooled ``aiohttp`` session (keep-alive reuse)."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        allow_hosts: Sequence[str] = (),
        allow_private: bool = False,
        timeout: float = 30.0,
        max_connections: int = 100,
        max_retry_after: float = 3600.0,
        id_prefix: str = "",
        user_agent: str = "outbox-worker",
        max_bytes: int | None = None,
    ) -> None:
        if secret is not None and not secret:
            raise ConfigError("--webhook-secret is empty")
        self._secret = secret
        self._allow_hosts = tuple(allow_hosts)
        self._policy = DestinationPolicy(allow_private=allow_private, allow_hosts=allow_hosts)
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 10.0))
        self._max_connections = max_connections
        self._max_retry_after = max_retry_after
        self._id_prefix = id_prefix
        self._user_agent = user_agent
        self._size = SizeLimit("webhook", max_bytes, WEBHOOK_DEFAULT)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        allow = ",".join(self._allow_hosts) or "any host"
        private = self._policy.allow_private
        return f"WebhookSink(allow={allow}, private={private}, signed={self._secret is not None})"

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use: a session belongs to the running event loop.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=GuardedConnector(self._policy, limit=self._max_connections),
                timeout=self._timeout,
                headers={"User-Agent": self._user_agent},
            )
        return self._session

    def headers_for(self, intent: Intent, request: WebhookRequest) -> dict[str, str]:
        headers = dict(with_trace_context(request.headers, intent))
        headers["Idempotency-Key"] = f"{self._id_prefix}{intent.id}"
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, int(time.time()), request.body)
        return headers

    async def deliver(self, intent: Intent) -> None:
        request = build_request(intent, self._allow_hosts)
        self._policy.check_literal(request.url.host or "")
        where = f"{request.method} {request.target}"
        self._size.check(f"{where}: request body", len(request.body or b""))
        try:
            async with self._client().request(
                request.method,
                request.url,
                data=request.body,
                headers=self.headers_for(intent, request),
                # Without a body, no made-up "application/octet-stream".
                skip_auto_headers=("Content-Type",) if request.body is None else None,
                allow_redirects=False,
            ) as response:
                head = await _read_head(response)
                if 200 <= response.status < 300:
                    return
                text = head.decode("utf-8", errors="replace")
                self._raise_for(where, response.status, response.headers, text)
        except TimeoutError:
            raise TransientError(f"{where}: no response within {self._timeout.total:g}s") from None
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, DestinationRefused):
                raise PermanentError(str(exc.os_error)) from None
            # Transient: a resolver outage looks the same as a typo. A typo ends dead once the
            # attempts run out, with this message.
            raise TransientError(f"{where}: cannot resolve host ({exc.os_error})") from None
        except aiohttp.ClientConnectorError as exc:
            raise TransientError(f"{where}: cannot connect ({exc.os_error})") from None
        except (aiohttp.ClientError, OSError) as exc:
            text = str(exc).replace(str(request.url), request.target)  # no path, no token
            raise TransientError(f"{where}: {type(exc).__name__}: {text}") from None

    def _raise_for(self, where: str, status: int, headers: Mapping[str, Any], text: str) -> None:
        reason = f"{where}: HTTP {status}"
        if text.strip():
            reason += f": {_one_line(text)}"
        if status in _TRANSIENT_STATUS or status >= 500:
            retry_after = parse_retry_after(headers.get("Retry-After"))
            if retry_after is not None:
                retry_after = min(retry_after, self._max_retry_after)
            raise TransientError(reason, retry_after=retry_after)
        if 300 <= status < 400:
            reason += " (redirects are not followed; update the url)"
        raise PermanentError(reason)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
