-- What each object means, in the catalog itself: `\d+ outbox.intent` shows it, and the
-- reference page docs/reference/sql.md is generated from it. Comments only: no table
-- rewrite, and the lock COMMENT takes (SHARE UPDATE EXCLUSIVE) lets producers and workers
-- read and write the table meanwhile.
COMMENT ON TABLE {{schema}}.intent IS
    'Intents: what to deliver once the transaction that wrote them commits. Insert with '
    'enqueue() or a plain INSERT of kind and payload; the workers do the rest.';
COMMENT ON COLUMN {{schema}}.intent.id IS
    'Identity; intents of one ordering key are delivered in id order.';
COMMENT ON COLUMN {{schema}}.intent.kind IS
    'Which sink or handler delivers it: email, webhook, rabbitmq, nats, sidekiq, celery, sqs, '
    'kafka, or the name of your handler.';
COMMENT ON COLUMN {{schema}}.intent.payload IS
    'What to deliver; its shape depends on the kind.';
COMMENT ON COLUMN {{schema}}.intent.status IS
    'pending, then processing while a worker holds it, then sent or dead.';
COMMENT ON COLUMN {{schema}}.intent.attempts IS
    'Deliveries started so far.';
COMMENT ON COLUMN {{schema}}.intent.max_attempts IS
    'Attempts before it is dead; NULL: the worker''s --max-attempts (default 10).';
COMMENT ON COLUMN {{schema}}.intent.run_at IS
    'Not delivered before this time; after a failed attempt, the time of the next one.';
COMMENT ON COLUMN {{schema}}.intent.locked_by IS
    'The worker that holds the lease, while processing.';
COMMENT ON COLUMN {{schema}}.intent.locked_until IS
    'When the lease ends unless renewed; then any worker may take the row back.';
COMMENT ON COLUMN {{schema}}.intent.last_error IS
    'Why the last attempt failed, or why it is dead.';
COMMENT ON COLUMN {{schema}}.intent.created_at IS
    'When it was written (the producer''s transaction time).';
COMMENT ON COLUMN {{schema}}.intent.sent_at IS
    'When its delivery was recorded; set exactly when sent.';
COMMENT ON COLUMN {{schema}}.intent.dedupe_key IS
    'Unique when set: a second enqueue with the same key inserts nothing and returns the first '
    'id.';
COMMENT ON COLUMN {{schema}}.intent.ordering_key IS
    'NULL: unordered. Else delivered after every earlier intent (lower id) of the same key, '
    'one at a time.';
COMMENT ON COLUMN {{schema}}.intent.ordering_skipped IS
    'A dead intent that no longer halts its ordering key (skip-dead, or --ordering-on-dead '
    'continue).';
COMMENT ON COLUMN {{schema}}.intent.ordering_held IS
    'The workers'' hint that this pending row waits behind its key''s head, so claims skip it; '
    'cleared when the head stops blocking.';
COMMENT ON COLUMN {{schema}}.intent.trace_context IS
    'NULL, or the producer''s W3C trace context: {"traceparent": ..., "tracestate": ...}.';
-- A table made by hand or by an older tool may lack some of these constraints: only those
-- there are commented.
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT * FROM (VALUES
        ('intent_kind_check',
         'A kind is never empty.'),
        ('intent_status_check',
         'The four statuses.'),
        ('intent_attempts_check',
         'Attempts count up from 0.'),
        ('intent_max_attempts_check',
         'At least one attempt.'),
        ('intent_ordering_key_not_empty',
         'An ordering key is NULL or not empty.'),
        ('intent_sent_at_iff_sent',
         'sent_at is set exactly when the intent is sent.'),
        ('intent_lease_iff_processing',
         'A lease (locked_by and locked_until) exactly while processing.'),
        ('intent_lease_both_or_neither',
         'locked_by and locked_until are set together or not at all.'),
        ('intent_dead_has_reason',
         'A dead intent always says why, in last_error.'),
        ('intent_trace_context_valid',
         'A valid traceparent and an optional tracestate of printable ASCII (at most 512 '
         'characters), nothing else. NOT VALID: rows from before the column are not checked.')
    ) AS v (name, note) LOOP
        IF EXISTS (SELECT FROM pg_catalog.pg_constraint
                   WHERE conrelid = '{{schema}}.intent'::regclass AND conname = c.name) THEN
            EXECUTE format('COMMENT ON CONSTRAINT %I ON {{schema}}.intent IS %L', c.name, c.note);
        END IF;
    END LOOP;
END
$$;
COMMENT ON INDEX {{schema}}.intent_pending_free IS
    'The claim: pending rows not held behind their ordering key, by run_at.';
COMMENT ON INDEX {{schema}}.intent_ordering_blocking IS
    'Rows that hold up their ordering key (pending, processing, or dead and not skipped): the '
    'claim looks here for an earlier row of the same key.';
COMMENT ON INDEX {{schema}}.intent_ordering_in_flight IS
    'At most one intent of each ordering key in flight.';
COMMENT ON INDEX {{schema}}.intent_ordering_halted IS
    'Dead intents that halt their ordering key (status, the dashboard, halted_key).';
COMMENT ON INDEX {{schema}}.intent_processing_lease IS
    'Leases by expiry, for the rescue of rows whose worker went away.';
COMMENT ON INDEX {{schema}}.intent_dead_kind IS
    'Dead intents by kind (retry-dead --kind, status).';
COMMENT ON INDEX {{schema}}.intent_dedupe_key IS
    'One intent per dedupe_key.';
COMMENT ON VIEW {{schema}}.halted_key IS
    'Ordering keys halted by a dead intent, with that intent: retry-dead --key or skip-dead '
    'lets the key move on.';
COMMENT ON COLUMN {{schema}}.halted_key.ordering_key IS 'The halted key.';
COMMENT ON COLUMN {{schema}}.halted_key.id IS 'The dead intent that halts it.';
COMMENT ON COLUMN {{schema}}.halted_key.kind IS 'Its kind.';
COMMENT ON COLUMN {{schema}}.halted_key.last_error IS 'Why it is dead.';
COMMENT ON COLUMN {{schema}}.halted_key.created_at IS 'When it was written.';
COMMENT ON FUNCTION
    {{schema}}.enqueue(text, jsonb, timestamptz, text, integer, text, jsonb) IS
    'Writes an intent in the caller''s transaction and returns its id (the first one''s id '
    'when dedupe_key repeats). run_at NULL: now. Needs only EXECUTE: it runs with its owner''s '
    'rights.';
COMMENT ON TABLE {{schema}}.idle_worker IS
    'The workers waiting for a notification; producers notify only while it has a row. '
    'Unlogged: nothing here survives a crash, nor needs to.';
COMMENT ON COLUMN {{schema}}.idle_worker.backend_pid IS
    'The backend pid of the worker''s LISTEN connection (rows of vanished backends are swept).';
COMMENT ON COLUMN {{schema}}.idle_worker.worker_id IS 'The worker, as its leases name it.';
COMMENT ON COLUMN {{schema}}.idle_worker.since IS 'When it became idle.';
COMMENT ON TABLE {{schema}}.schema_version IS
    'The migrations outbox-worker migrate applied to this schema.';
COMMENT ON COLUMN {{schema}}.schema_version.version IS 'The migration''s number.';
COMMENT ON COLUMN {{schema}}.schema_version.name IS 'Its name (worker/store/migrations/NNNN_name.sql).';
COMMENT ON COLUMN {{schema}}.schema_version.applied_at IS 'When it was applied.';
COMMENT ON TRIGGER intent_notify ON {{schema}}.intent IS
    'At commit, once per transaction: NOTIFY the channel when a worker is idle (or when that '
    'cannot be checked without waiting).';
COMMENT ON TRIGGER intent_release_next_upd ON {{schema}}.intent IS
    'When an intent stops holding up its ordering key (sent, dead and skipped), clears '
    'ordering_held on the key''s next intent.';
COMMENT ON TRIGGER intent_release_next_del ON {{schema}}.intent IS
    'When an intent that held up its ordering key is deleted, clears ordering_held on the '
    'key''s next intent.';
