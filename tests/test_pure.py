"""Pure functions: backoff, outcome classification, URL redaction, name validation."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from worker.backoff import jittered, retry_delay
from worker.errors import ConfigError, PermanentError, TransientError
from worker.intent import Intent
from worker.logs import redact_url
from worker.outcome import Dead, Retry, Sent
from worker.relay.delivery import RetryPolicy, classify
from worker.settings import Settings, validate_name

POLICY = RetryPolicy(max_attempts=5, backoff_base=2.0, backoff_max=60.0)


def _intent(attempts: int, max_attempts: int = 5) -> Intent:
    now = datetime.now(UTC)
    return Intent(1, "k", {}, attempts, max_attempts, now, now)


def test_retry_delay_doubles_with_equal_jitter_and_is_capped():
    assert [retry_delay(n, base=2, cap=60, rand=lambda: 0.0) for n in (1, 2, 3)] == [1, 2, 4]
    assert [retry_delay(n, base=2, cap=60, rand=lambda: 1.0) for n in (1, 2, 3)] == [2, 4, 8]
    assert retry_delay(50, base=2, cap=60, rand=lambda: 1.0) == 60
    assert retry_delay(10_000, base=2, cap=60, rand=lambda: 0.5) == 45  # no overflow


def test_jittered_stays_within_spread():
    assert jittered(2.0, rand=lambda: 0.0) == pytest.approx(2.0)
    assert jittered(2.0, rand=lambda: 1.0) == pytest.approx(2.4)


def test_classify():
    assert classify(_intent(1), None, POLICY) == Sent()
    assert classify(_intent(1), PermanentError("550 no such user"), POLICY) == Dead(
        "550 no such user"
    )
    retry = classify(_intent(2), TransientError("451 try later"), POLICY)
    assert isinstance(retry, Retry) and 2 <= retry.delay <= 4 and retry.error == "451 try later"
    assert classify(_intent(1), TransientError("slow down", retry_after=30), POLICY) == Retry(
        30, "slow down"
    )
    exhausted = classify(_intent(5), ValueError("boom"), POLICY)
    assert exhausted == Dead("attempts exhausted (5/5); last: ValueError: boom")


def test_redact_url_hides_only_the_password():
    assert redact_url("postgresql://app:pw@db:5433/x?sslmode=require") == (
        "postgresql://app:***@db:5433/x?sslmode=require"
    )
    assert redact_url("postgresql://app@db/x") == "postgresql://app@db/x"


@pytest.mark.parametrize("name", ["outbox", "Billing", "_x9", "a" * 63])
def test_valid_names_are_kept_exactly(name: str):
    assert validate_name("schema name", name) == name


@pytest.mark.parametrize("name", ['a"b', "a;b", "a b", "", "9a", "ä" * 32, "a" * 64])
def test_invalid_names_are_refused(name: str):
    with pytest.raises(ConfigError):
        validate_name("schema name", name)


def test_settings_validate_their_relations():
    # The lease is renewed by the heartbeat (every lease/3), not by the LISTEN ping.
    assert Settings(lease=1.0, ping_interval=5.0).lease == 1.0
    with pytest.raises(ConfigError, match=r"^--linger \(5 s\) .* --poll-interval \(2 s\)$"):
        Settings(linger=5.0, poll_interval=2.0)
    with pytest.raises(ConfigError, match=r"^--lease must be positive, got 0$"):
        Settings(lease=0)


def test_settings_repr_hides_secrets():
    settings = Settings(
        dsn="postgresql://u:dbpw@h/d", sink_options={"smtp_url": "smtp://u:mailpw@h:587"}
    )
    assert "dbpw" not in repr(settings) and "mailpw" not in repr(settings)


async def test_delivery_timeout_is_ours_and_a_sink_timeout_is_its_own():
    import anyio

    from worker.observe.stats import Stats
    from worker.relay.dispatch import Dispatcher
    from worker.sinks.handlers import HandlerSink

    async def hangs(_intent: Intent) -> None:
        await anyio.sleep(60)

    async def raises_timeout(_intent: Intent) -> None:
        raise TimeoutError("upstream API timed out")

    outcomes: dict[int, object] = {}
    dispatcher = Dispatcher(
        concurrency=2,
        sinks={"hangs": HandlerSink(hangs), "raises": HandlerSink(raises_timeout)},
        policy=POLICY,
        timeout=0.05,
        stats=Stats(2),
        on_outcome=lambda intent, outcome: outcomes.__setitem__(intent.id, outcome),
    )
    now = datetime.now(UTC)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(dispatcher.run)
            dispatcher.dispatch(
                [Intent(1, "hangs", {}, 1, 5, now, now), Intent(2, "raises", {}, 1, 5, now, now)]
            )
            while len(outcomes) < 2:  # noqa: ASYNC110 (no event to wait on in this test)
                await anyio.sleep(0.01)
            dispatcher.close()
    slow, own = outcomes[1], outcomes[2]
    assert isinstance(slow, Retry) and slow.error == "delivery timed out after 0.05s"
    assert isinstance(own, Retry) and own.error == "TimeoutError: upstream API timed out"
    assert dispatcher.free == 2  # both slots are free again


def test_long_schema_names_get_a_channel_that_fits():
    from worker.settings import default_channel

    assert default_channel("outbox") == "outbox_intent"
    long_name = "s" * 60
    assert default_channel(long_name) == long_name
    Settings(schema=long_name, channel=default_channel(long_name))  # accepted


def test_asyncpg_pool_reconnect_failures_log_one_line(capsys):
    import logging

    from worker import logs

    logs.setup("text")
    try:
        raise ConnectionRefusedError(111, "Connect call failed")
    except OSError:
        logging.getLogger("asyncpg.pool").warning("Failed to restore the pool", exc_info=True)
    err = capsys.readouterr().err
    assert "Failed to restore the pool: ConnectionRefusedError" in err
    assert "Traceback" not in err
