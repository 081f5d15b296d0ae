"""Webhooks that point inward: loopback, private, link-local and other non-global destinations
are refused by default, after the one DNS lookup whose addresses are the ones connected to.

The receiver is a real aiohttp server on 127.0.0.1. Names come from the machine's resolver
(``localhost``), from literal addresses, or, for answers no real name gives (a rebinding
server, a name with mixed answers), from ``ScriptedDNS``: the DNS under the guard, never the
guard itself. Where the scripted answers include a global address, a socket factory stands in
for the internet: it records the address the connector tries and fails it, so nothing
leaves the machine, while 127.0.0.1 gets a real socket, as a guard that let it through would.
"""

from __future__ import annotations

import errno
import socket
import ssl
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from tests.test_sink_webhook import Receiver, Reply, webhook_receiver  # noqa: F401 (fixture)
from worker.errors import PermanentError, TransientError
from worker.intent import Intent
from worker.sinks.webhook.guard import (
    DestinationPolicy,
    DestinationRefused,
    GuardedConnector,
    GuardedResolver,
    refusal,
)
from worker.sinks.webhook.sink import WebhookSink, parse_allow_hosts

FLAG_HINT = "refused (allow with --webhook-allow-private)"
NAME_HINT = (
    "refused (allow with --webhook-allow-private, or name the host in --webhook-allow-hosts)"
)
PUBLIC = "93.184.215.14"  # a global address: only ever handed to the stand-in socket factory


def _intent(url: str, n: int = 1) -> Intent:
    now = datetime.now(UTC)
    return Intent(n, "webhook", {"url": url, "body": {"n": n}}, 1, 5, now, now)


async def _deliver(url: str, **sink_options: Any) -> None:
    sink = WebhookSink(timeout=5.0, **sink_options)
    try:
        await sink.deliver(_intent(url))
    finally:
        await sink.aclose()


# --- which addresses (pure) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("100.64.0.1", "shared address space (CGNAT)"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("fec0::1", "site-local"),
        ("::7f00:1", "reserved"),  # IPv4-compatible, deprecated
        ("0.1.2.3", "not globally routable"),
        ("192.0.2.1", "not globally routable"),
        ("198.18.0.1", "not globally routable"),
        ("2001:db8::1", "not globally routable"),
        ("::ffff:127.0.0.1", "loopback (IPv4 127.0.0.1 in IPv6 form)"),
        ("::ffff:169.254.169.254", "link-local (IPv4 169.254.169.254 in IPv6 form)"),
        ("2002:a9fe:a9fe::", "link-local (IPv4 169.254.169.254 in IPv6 form)"),  # 6to4
        ("64:ff9b::a00:1", "private (IPv4 10.0.0.1 in IPv6 form)"),  # NAT64
        ("64:ff9b:1::1", "private"),  # local-use NAT64
        ("localhost", "not an IP address"),
    ],
)
def test_refused_addresses_and_why(address: str, why: str) -> None:
    assert refusal(address) == why


@pytest.mark.parametrize(
    "address", [PUBLIC, "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_global_addresses_pass(address: str) -> None:
    assert refusal(address) is None


# --- the sink: refused by default, reached when allowed ----------------------------------------


async def test_loopback_by_name_and_literal_is_refused_by_default(receiver: Receiver) -> None:
    port = receiver.port
    with pytest.raises(PermanentError) as by_name:
        await _deliver(f"http://localhost:{port}/hook")
    assert str(by_name.value).startswith("webhook destination localhost resolves to 127.0.0.1")
    assert "(loopback)" in str(by_name.value) and str(by_name.value).endswith(NAME_HINT)
    with pytest.raises(PermanentError) as literal:
        await _deliver(f"http://127.0.0.1:{port}/hook")
    assert str(literal.value) == f"webhook destination 127.0.0.1 is loopback: {FLAG_HINT}"
    assert receiver.requests == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is link-local"),
        ("http://[fe80::a9fe:a9fe]/", "fe80::a9fe:a9fe is link-local"),
        ("http://[::1]:8080/", "::1 is loopback"),
        ("http://10.0.0.1/", "10.0.0.1 is private"),
        ("https://192.168.0.1/", "192.168.0.1 is private"),
        ("http://0.0.0.0/", "0.0.0.0 is unspecified"),
        ("http://100.64.0.1/", "100.64.0.1 is shared address space (CGNAT)"),
        ("http://224.0.0.251/", "224.0.0.251 is multicast"),
        ("http://[::ffff:127.0.0.1]/", "::ffff:7f00:1 is loopback (IPv4 127.0.0.1 in IPv6 form)"),
    ],
)
async def test_literal_destinations_are_refused_with_a_clear_reason(url: str, reason: str) -> None:
    with pytest.raises(PermanentError) as refused:
        await _deliver(url)
    assert str(refused.value) == f"webhook destination {reason}: {FLAG_HINT}"


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f000001", "017700000001"])
async def test_numeric_shorthands_for_an_address_are_refused(host: str) -> None:
    for allow_private in (False, True):  # aiohttp refuses most of them anyway: say why, at once
        with pytest.raises(PermanentError, match=f"'{host}' is not a canonical IP address"):
            await _deliver(f"http://{host}/", allow_private=allow_private)


async def test_allow_private_reaches_loopback_by_name_and_literal(receiver: Receiver) -> None:
    await _deliver(f"http://localhost:{receiver.port}/a", allow_private=True)
    await _deliver(f"http://127.0.0.1:{receiver.port}/b", allow_private=True)
    assert [r.path for r in receiver.requests] == ["/a", "/b"]


async def test_a_host_named_in_allow_hosts_is_reached_and_no_other(receiver: Receiver) -> None:
    allowed = {"allow_hosts": parse_allow_hosts("localhost")}
    await _deliver(f"http://localhost:{receiver.port}/named", **allowed)
    with pytest.raises(PermanentError, match=r"'127\.0\.0\.1' is not in --webhook-allow-hosts"):
        await _deliver(f"http://127.0.0.1:{receiver.port}/literal", **allowed)
    await _deliver(f"http://127.0.0.1:{receiver.port}/ip", allow_hosts=("127.0.0.1",))
    assert [r.path for r in receiver.requests] == ["/named", "/ip"]
    assert receiver.requests[0].headers["Host"] == f"localhost:{receiver.port}"


async def test_redirects_are_still_not_followed(receiver: Receiver) -> None:
    receiver.script.append(Reply(302, {"Location": "http://169.254.169.254/latest/"}, "moved"))
    with pytest.raises(PermanentError, match=r"HTTP 302: moved \(redirects are not followed"):
        await _deliver(f"http://localhost:{receiver.port}/", allow_hosts=("localhost",))
    assert len(receiver.requests) == 1


async def test_unresolvable_name_is_still_transient() -> None:
    with pytest.raises(TransientError, match="cannot resolve host"):
        await _deliver("http://no-such-host.invalid/")


# --- the resolver under aiohttp's connector -------------------------------------------------


class ScriptedDNS(AbstractResolver):
    """The DNS under the guard: per name, one list of addresses per lookup (the last one
    repeats), as a rebinding server with a zero TTL would answer."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append(host)
        script = self.answers[host]
        addresses = script.pop(0) if len(script) > 1 else script[0]
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                proto=0,
                flags=socket.AI_NUMERICHOST,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
            )
            for a in addresses
        ]

    async def close(self) -> None:
        pass


class Network:
    """The connector's socket factory: records every address it connects to; 127.0.0.1 is
    real, anything else is unreachable."""

    def __init__(self) -> None:
        self.connects: list[str] = []

    def socket(self, addr_info: Any) -> socket.socket:
        family, type_, proto, _, address = addr_info
        self.connects.append(address[0])
        if address[0] != "127.0.0.1":
            raise OSError(errno.ENETUNREACH, "unreachable (the test's stand-in internet)")
        return socket.socket(family, type_, proto)


async def _get(session: aiohttp.ClientSession, url: str) -> int | BaseException:
    try:
        async with session.get(url, allow_redirects=False) as response:
            return response.status
    except aiohttp.ClientConnectorError as exc:
        return exc.os_error


def _session(dns: ScriptedDNS, network: Network, policy: DestinationPolicy, **kw: Any) -> Any:
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(policy, dns), socket_factory=network.socket, **kw
    )
    return aiohttp.ClientSession(connector=connector)


@pytest.mark.parametrize("use_dns_cache", [False, True])
async def test_a_rebinding_name_never_reaches_loopback(
    receiver: Receiver, use_dns_cache: bool
) -> None:
    """Public on the first answer, 127.0.0.1 on every later one: a check that looked the name
    up separately from the connection would connect to 127.0.0.1."""
    dns = ScriptedDNS({"rebind.test": [[PUBLIC], ["127.0.0.1"]]})
    network = Network()
    url = f"http://rebind.test:{receiver.port}/"
    async with _session(dns, network, DestinationPolicy(), use_dns_cache=use_dns_cache) as s:
        first, second = await _get(s, url), await _get(s, url)
    assert isinstance(first, OSError) and first.errno == errno.ENETUNREACH
    assert receiver.requests == [] and "127.0.0.1" not in network.connects
    if use_dns_cache:  # the cache holds what the guard returned: the checked address
        assert dns.lookups == ["rebind.test"] and network.connects == [PUBLIC, PUBLIC]
        assert isinstance(second, OSError) and second.errno == errno.ENETUNREACH
    else:  # one lookup per connection, its answer checked, then used
        assert dns.lookups == ["rebind.test", "rebind.test"] and network.connects == [PUBLIC]
        assert isinstance(second, DestinationRefused)
        assert str(second) == (
            f"webhook destination rebind.test resolves to 127.0.0.1 (loopback): {NAME_HINT}"
        )


async def test_mixed_answers_connect_only_to_the_allowed_address(receiver: Receiver) -> None:
    """Without the filter, the connector would fall back from the unreachable public address
    to 127.0.0.1 and reach the receiver."""
    dns = ScriptedDNS({"mixed.test": [["127.0.0.1", PUBLIC, "169.254.169.254"]]})
    network = Network()
    async with _session(dns, network, DestinationPolicy()) as session:
        outcome = await _get(session, f"http://mixed.test:{receiver.port}/")
    assert isinstance(outcome, OSError) and network.connects == [PUBLIC]
    assert receiver.requests == []


async def test_names_resolving_to_loopback_or_link_local_reached_only_when_allowed(
    receiver: Receiver,
) -> None:
    answers = {
        "app.internal.test": [["127.0.0.1"]],
        "metadata.internal.test": [["169.254.169.254", "fe80::a9fe:a9fe"]],
        "hooks.partner.test": [["127.0.0.1"]],
    }
    patterns = parse_allow_hosts("app.internal.test, *.partner.test")
    policies = {
        "default": DestinationPolicy(),
        "named": DestinationPolicy(allow_hosts=patterns),
        "private": DestinationPolicy(allow_private=True),
    }
    outcomes: dict[tuple[str, str], int | BaseException] = {}
    for which, policy in policies.items():
        network = Network()
        async with _session(ScriptedDNS(answers), network, policy) as session:
            for name in answers:
                outcomes[which, name] = await _get(session, f"http://{name}:{receiver.port}/")
    refused = {key for key, got in outcomes.items() if isinstance(got, DestinationRefused)}
    reached = {key for key, got in outcomes.items() if got == 200}
    assert refused == {
        ("default", "app.internal.test"),
        ("default", "metadata.internal.test"),
        ("default", "hooks.partner.test"),
        ("named", "metadata.internal.test"),
        ("named", "hooks.partner.test"),  # a *. pattern vouches for no address
    }
    assert reached == {
        ("named", "app.internal.test"),
        ("private", "app.internal.test"),
        ("private", "hooks.partner.test"),
    }
    # Allowed, the metadata name was connected to (the stand-in network refused it).
    assert isinstance(outcomes["private", "metadata.internal.test"], OSError)
    assert str(outcomes["default", "metadata.internal.test"]) == (
        "webhook destination metadata.internal.test resolves to 169.254.169.254 (link-local), "
        f"fe80::a9fe:a9fe (link-local): {NAME_HINT}"
    )
    assert {r.headers["Host"] for r in receiver.requests} == {
        f"app.internal.test:{receiver.port}",
        f"hooks.partner.test:{receiver.port}",
    }


async def test_tls_checks_the_certificate_and_sends_sni_for_the_name() -> None:
    """Connected by address, the TLS handshake still names the URL's host: the certificate
    is for ``localhost`` only, and verification passes."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    sni: list[str | None] = []
    server_ctx.sni_callback = lambda _obj, name, _ctx: sni.append(name)  # type: ignore[assignment,return-value]
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx).start()
    port = runner.addresses[0][1]
    policy = DestinationPolicy(allow_hosts=("localhost",))
    try:
        async with aiohttp.ClientSession(connector=GuardedConnector(policy)) as session:
            async with session.get(f"https://localhost:{port}/", ssl=client_ctx) as response:
                assert (response.status, await response.text()) == (200, "ok")
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(f"https://127.0.0.1:{port}/", ssl=client_ctx)
    finally:
        await runner.cleanup()
    assert sni == ["localhost", None]  # a request by address sends no name
