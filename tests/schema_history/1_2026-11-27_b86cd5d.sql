-- schema.sql
-- outbox-worker schema. Applied by `outbox-worker migrate` (idempotent, under an advisory
-- lock), or printed by `outbox-worker schema` for your own migration tool.
-- {{schema}} is the configured schema (default "outbox"), quoted as an identifier.

CREATE SCHEMA IF NOT EXISTS {{schema}};

CREATE TABLE IF NOT EXISTS {{schema}}.intent (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind          text        NOT NULL CHECK (kind <> ''),
    payload       jsonb       NOT NULL,
    status        text        NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'processing', 'sent', 'dead')),
    attempts      integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- NULL: the worker's --max-attempts applies.
    max_attempts  integer     CHECK (max_attempts > 0),
    run_at        timestamptz NOT NULL DEFAULT now(),
    locked_by     text,
    locked_until  timestamptz,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz,
    dedupe_key    text,
    -- The state machine, enforced by the database rather than trusted to every writer.
    CONSTRAINT intent_sent_at_iff_sent CHECK ((status = 'sent') = (sent_at IS NOT NULL)),
    CONSTRAINT intent_lease_iff_processing
        CHECK ((status = 'processing') = (locked_by IS NOT NULL AND locked_until IS NOT NULL)),
    CONSTRAINT intent_lease_both_or_neither CHECK ((locked_by IS NULL) = (locked_until IS NULL)),
    CONSTRAINT intent_dead_has_reason CHECK (status <> 'dead' OR last_error IS NOT NULL)
);

-- Partial indexes cover only the rows the worker scans, so claiming stays an index scan
-- however many sent rows the table holds.
CREATE INDEX IF NOT EXISTS intent_pending_run_at
    ON {{schema}}.intent (run_at, id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS intent_processing_lease
    ON {{schema}}.intent (locked_until) WHERE status = 'processing';
CREATE INDEX IF NOT EXISTS intent_dead_kind
    ON {{schema}}.intent (kind) WHERE status = 'dead';
CREATE UNIQUE INDEX IF NOT EXISTS intent_dedupe_key
    ON {{schema}}.intent (dedupe_key) WHERE dedupe_key IS NOT NULL;

-- One SQL call for producers in any language, inside their own transaction.
-- A second call with the same dedupe_key inserts nothing and returns the first id.
CREATE OR REPLACE FUNCTION {{schema}}.enqueue(
    kind         text,
    payload      jsonb,
    run_at       timestamptz DEFAULT NULL,
    dedupe_key   text        DEFAULT NULL,
    max_attempts integer     DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO {{schema}}.intent AS i (kind, payload, run_at, dedupe_key, max_attempts)
    VALUES (enqueue.kind, enqueue.payload, COALESCE(enqueue.run_at, now()),
            enqueue.dedupe_key, enqueue.max_attempts)
    ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
    RETURNING i.id INTO new_id;
    IF new_id IS NULL THEN
        -- ON CONFLICT waited for a concurrent inserter of the same key to commit, so the
        -- row is visible to this new statement (READ COMMITTED).
        SELECT i.id INTO new_id FROM {{schema}}.intent AS i WHERE i.dedupe_key = enqueue.dedupe_key;
    END IF;
    RETURN new_id;
END;
$$;

-- 010_notify_on_insert.sql
-- Wake the workers when intents are committed.
--
-- NOTIFY is delivered only at commit, and identical notifications (same channel, same
-- payload) in one transaction fold into one, so a constant payload means a 10,000-row
-- INSERT wakes the pool once. Insert only: claims and outcome writes never notify.
CREATE OR REPLACE FUNCTION {{schema}}.notify_intent_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify({{channel}}, '');
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS intent_notify ON {{schema}}.intent;
CREATE TRIGGER intent_notify
    AFTER INSERT ON {{schema}}.intent
    FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.notify_intent_inserted();
