"""Webhooks that point inward: refuse loopback, private, link-local (cloud metadata) and other
addresses that are not globally routable, unless the operator allows them.

Webhook URLs often come from the application's users, and the worker usually runs inside
the network they must not reach. The check happens on the addresses a name resolves to,
inside aiohttp's resolver: the connector connects only to the addresses this resolver
returned (and caches only those), so there is no second lookup for a rebinding DNS server
to answer differently. Literal IP hosts never reach a resolver; ``check_literal`` covers
them before the request. TLS (SNI, certificate check) and ``Host`` still use the URL's name.

Allowed anyway: everything with ``--webhook-allow-private``; and a host named exactly in
``--webhook-allow-hosts`` (the operator vouched for that host). A ``*.example.com`` pattern
only restricts names: who controls a subdomain's DNS could point it anywhere.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any

from aiohttp import TCPConnector
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from worker.errors import PermanentError

__all__ = [
    "DestinationPolicy",
    "DestinationRefused",
    "GuardedConnector",
    "GuardedResolver",
    "refusal",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_FLAG = "--webhook-allow-private"
_CGNAT = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598, provider-internal
_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are an IPv4 address
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215, local-use translation
_MAX_NAMED = 4  # addresses named in one refusal


class DestinationRefused(OSError):
    """Raised by the resolver: aiohttp hands resolver errors on as the ``os_error`` of a
    ``ClientConnectorDNSError``, where the sink finds it and makes the intent dead."""


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form leads to: ``::ffff:a.b.c.d``, 6to4, NAT64."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal(address: str) -> str | None:
    """What makes ``address`` off limits (``"loopback"``, ``"link-local"``...), or None if it
    is globally routable. Python's ``is_global`` alone lets multicast, site-local and the
    IPv6 forms of IPv4 addresses through, hence the explicit checks first."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "not an IP address"
    inner = _embedded_ipv4(ip)
    if inner is not None:
        why = refusal(str(inner))
        return None if why is None else f"{why} (IPv4 {inner} in IPv6 form)"
    checks = (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (ip in _CGNAT, "shared address space (CGNAT)"),
        (any(ip in net for net in _PRIVATE) or ip in _NAT64_LOCAL, "private"),
        (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local, "site-local"),
        (ip.is_reserved, "reserved"),
        (not ip.is_global, "not globally routable"),
    )
    return next((what for hit, what in checks if hit), None)


class DestinationPolicy:
    """Which webhook destinations are allowed (see the module's docstring)."""

    def __init__(self, *, allow_private: bool = False, allow_hosts: Sequence[str] = ()) -> None:
        self.allow_private = allow_private
        self._named = frozenset(p for p in allow_hosts if not p.startswith("*."))

    def __repr__(self) -> str:
        return f"DestinationPolicy(allow_private={self.allow_private})"

    def trusts(self, host: str) -> bool:
        return self.allow_private or host.lower().rstrip(".") in self._named

    def check_literal(self, host: str) -> None:
        """Raise ``PermanentError`` for a URL host that is a refused IP address, or a legacy
        numeric IPv4 form (``127.1``, ``2130706433``, ``0x7f000001``) that aiohttp would
        refuse anyway and a resolver might map onto loopback. Names pass: the resolver
        checks what they resolve to."""
        bare = host.rstrip(".")
        try:
            ipaddress.ip_address(bare)
        except ValueError:
            if _legacy_ipv4(bare):
                raise PermanentError(
                    f"webhook host {host!r} is not a canonical IP address; write it as "
                    f"{socket.inet_ntoa(socket.inet_aton(bare))}"
                ) from None
            return
        why = None if self.trusts(bare) else refusal(bare)
        if why is not None:
            raise PermanentError(
                f"webhook destination {bare} is {why}: refused (allow with {_FLAG})"
            )

    def filter(self, host: str, results: list[ResolveResult]) -> list[ResolveResult]:
        """The resolved addresses a connection may use; ``DestinationRefused`` if none."""
        if self.trusts(host):
            return results
        allowed = [r for r in results if refusal(r["host"]) is None]
        if allowed or not results:
            return allowed
        named = list(dict.fromkeys(r["host"] for r in results))
        shown = ", ".join(f"{a} ({refusal(a)})" for a in named[:_MAX_NAMED])
        if len(named) > _MAX_NAMED:
            shown += f" and {len(named) - _MAX_NAMED} more"
        raise DestinationRefused(
            f"webhook destination {host.rstrip('.')} resolves to {shown}: refused (allow with "
            f"{_FLAG}, or name the host in --webhook-allow-hosts)"
        )


def _legacy_ipv4(host: str) -> bool:
    """True for the numeric forms inet_aton() takes beyond dotted quads (``127.1``, ``0x7f.1``,
    ``2130706433``): never a real name, since a top-level domain is not all digits."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


class GuardedResolver(AbstractResolver):
    """Resolves once through ``inner`` (aiohttp's default resolver unless given) and returns
    only the addresses ``policy`` allows."""

    def __init__(self, policy: DestinationPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return self._policy.filter(host, await self._inner.resolve(host, port, family))

    async def close(self) -> None:
        await self._inner.close()


class GuardedConnector(TCPConnector):
    """A ``TCPConnector`` on a ``GuardedResolver`` it owns (and closes with itself)."""

    def __init__(self, policy: DestinationPolicy, **kwargs: Any) -> None:
        self._guard = GuardedResolver(policy)
        super().__init__(resolver=self._guard, **kwargs)

    async def close(self, **kwargs: Any) -> None:  # abort_ssl= in newer aiohttp only
        await super().close(**kwargs)
        await self._guard.close()
