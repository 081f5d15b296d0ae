"""8. The webhook, RabbitMQ, NATS, Sidekiq, celery (on RabbitMQ, on Redis), SQS (standard,
FIFO; on moto's server, which the run starts) and Kafka (on a Tansu broker, which the run
starts) sinks (and a no-op one): each driven alone from C tasks, then through the relay with C
delivery slots, in turn within each round (bench/sinks.py). The kinds of ``--limited``
(default: nats) run a third time in each round, through the relay under ``--limits
KIND:concurrency=C``: a limit that changes nothing, so it should cost nothing. Kafka also runs
the same intents through the relay into a no-op sink in each round: its drain next to the
relay's own ceiling. Needs RabbitMQ, NATS and Redis on their default local ports; skipped,
with the reason, without."""

from __future__ import annotations

from bench import sinks
from bench.context import Context
from bench.figures import Row

TITLE = "Sinks alone and through the relay (intents/s, same round)"
METRICS = ("intents_per_s", "vs_sink_alone", "vs_relay", "vs_noop_relay")
MODES = {"sink": "sink alone", "relay": "through the relay"}
LIMITED = "through the relay with --limits {kind}:concurrency={c}"
NOOP = "through the relay into a no-op sink instead"


async def run(ctx: Context) -> list[Row]:
    urls = ctx.broker_urls or sinks.URLS
    why = await sinks.unreachable(urls)
    if why is not None:
        ctx.skipped["sinks"] = why
        ctx.progress(f"sinks: skipped, {why}")
        return []
    rows: dict[tuple[str, int, str], Row] = {}
    for kind in sinks.SINKS:
        for c in ctx.size.sink_concurrency:
            labels = dict(MODES)
            if kind in ctx.limited_sinks:
                labels["limited"] = LIMITED.format(kind=kind, c=c)
            if kind in sinks.WITH_NOOP:
                labels["noop"] = NOOP
            for mode, label in labels.items():
                params = {"sink": kind, "mode": mode, "concurrency": c}
                rows[kind, c, mode] = Row("sinks", f"{kind}, {label}, concurrency {c}", params)

    def record(kind: str, concurrency: int, rates: dict[str, float]) -> None:
        ctx.progress(
            f"sinks: {kind} at concurrency {concurrency}: {rates['sink']:,.0f}/s alone, "
            f"{rates['relay']:,.0f}/s through the relay"
        )
        rows[kind, concurrency, "sink"].add({"intents_per_s": rates["sink"]})
        relay = {"intents_per_s": rates["relay"], "vs_sink_alone": rates["relay"] / rates["sink"]}
        if "noop" in rates:
            relay["vs_noop_relay"] = rates["relay"] / rates["noop"]
            rows[kind, concurrency, "noop"].add({"intents_per_s": rates["noop"]})
        rows[kind, concurrency, "relay"].add(relay)
        if "limited" in rates:
            rows[kind, concurrency, "limited"].add(
                {
                    "intents_per_s": rates["limited"],
                    "vs_sink_alone": rates["limited"] / rates["sink"],
                    "vs_relay": rates["limited"] / rates["relay"],
                }
            )

    versions = await sinks.measure_rounds(
        list(sinks.SINKS), list(ctx.size.sink_concurrency), list(MODES),
        ctx.size.sink_intents, ctx.runs, ctx.dsn, urls, record, ctx.limited_sinks,
    )  # fmt: skip
    for row in rows.values():
        row.notes["versions"] = versions
    return list(rows.values())
