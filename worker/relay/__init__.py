"""The relay core: claim, deliver, record. One owner per concern, one intent's path:

    producer COMMIT ──▶ trigger NOTIFY (only while a worker is idle) ──▶ listener ──▶ wakeup
                                                                                    │
    claimer ◀─────────── wakeup, the jittered poll, a freed slot, a retry falling due ┘
      │  claims ≤ free slots and ≤ room under the bound on rows held, one statement
      ▼  (UPDATE … WHERE id = ANY(ARRAY(SELECT … FOR UPDATE SKIP LOCKED)))
    inflight.claimed ──▶ dispatch: one deque, N slot tasks, a timeout watchdog
                              │ sink.deliver / deliver_many (worker/sinks/)
                              ▼
    inflight.delivered ──▶ writer: one fenced, batched UPDATE ──▶ inflight: recorded, room
                                                                   made, claims resume
    leases (heartbeat every lease/3 over every held row; rescue of other workers' expired
    rows), retention (finished rows past --retain-sent / --retain-dead deleted in small
    windows, one deleter at a time) and the listener run beside them; core.Relay starts them
    all and stops them in two phases (stop claiming; in-flight deliveries get --grace; the
    rest released; then the services beside them).

claimer.py     where a row is claimed: linger, the idle flag, the poll, the next due row
dispatch.py    delivery slots, chunks for batch sinks, the per-delivery deadline
delivery.py    what a sink's exception means for the intent (pure)
inflight.py    the one owner of a held row, claimed -> recorded; backpressure on the claims
writer.py      the batched, fenced outcome write (the values are worker/outcome.py)
leases.py      the heartbeat and the rescue of expired leases
listener.py    the dedicated LISTEN connection: ping, reconnect, catch-up
retention.py   finished rows deleted past their age, by one worker at a time
wakeup.py      the coalescing "there may be work" signal
core.py        the parts wired together, and their lifecycle
"""
