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
    -- Intents that share an ordering key are delivered one at a time, in id order (see the
    -- claim in worker/sql/relay.sql). NULL: unordered.
    ordering_key  text CONSTRAINT intent_ordering_key_not_empty CHECK (ordering_key <> ''),
    -- A dead intent that no longer holds up its key (discarded by an operator, or written
    -- by a worker running with --ordering-on-dead continue).
    ordering_skipped boolean NOT NULL DEFAULT false,
    -- A hint, never a rule: this pending row is known not to be its key's head, so claims
    -- need not look at it (kept out of intent_pending_free). Set by workers (hold_backlog),
    -- cleared by the release trigger when the row before it stops blocking.
    ordering_held boolean NOT NULL DEFAULT false,
    -- The state machine, enforced by the database rather than trusted to every writer.
    CONSTRAINT intent_sent_at_iff_sent CHECK ((status = 'sent') = (sent_at IS NOT NULL)),
    CONSTRAINT intent_lease_iff_processing
        CHECK ((status = 'processing') = (locked_by IS NOT NULL AND locked_until IS NOT NULL)),
    CONSTRAINT intent_lease_both_or_neither CHECK ((locked_by IS NULL) = (locked_until IS NULL)),
    CONSTRAINT intent_dead_has_reason CHECK (status <> 'dead' OR last_error IS NOT NULL)
);

-- Tables created before ordering keys get the columns too.
ALTER TABLE {{schema}}.intent
    ADD COLUMN IF NOT EXISTS ordering_key text
        CONSTRAINT intent_ordering_key_not_empty CHECK (ordering_key <> ''),
    ADD COLUMN IF NOT EXISTS ordering_skipped boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS ordering_held boolean NOT NULL DEFAULT false;

-- Partial indexes cover only the rows the worker scans, so claiming stays an index scan
-- however many sent rows the table holds.
CREATE INDEX IF NOT EXISTS intent_pending_free
    ON {{schema}}.intent (run_at, id) WHERE status = 'pending' AND NOT ordering_held;
DROP INDEX IF EXISTS {{schema}}.intent_pending_run_at;  -- replaced by intent_pending_free
-- The rows that hold up their key: pending, in flight, or dead and not skipped. The claim
-- probes it for a lower id of the same key.
CREATE INDEX IF NOT EXISTS intent_ordering_blocking
    ON {{schema}}.intent (ordering_key, id)
    WHERE ordering_key IS NOT NULL
      AND (status IN ('pending', 'processing') OR (status = 'dead' AND NOT ordering_skipped));
-- At most one intent per key in flight, enforced by the database itself.
CREATE UNIQUE INDEX IF NOT EXISTS intent_ordering_in_flight
    ON {{schema}}.intent (ordering_key) WHERE ordering_key IS NOT NULL AND status = 'processing';
-- Dead intents that halt their key (status, the dashboard).
CREATE INDEX IF NOT EXISTS intent_ordering_halted
    ON {{schema}}.intent (ordering_key, id)
    WHERE ordering_key IS NOT NULL AND status = 'dead' AND NOT ordering_skipped;
CREATE INDEX IF NOT EXISTS intent_processing_lease
    ON {{schema}}.intent (locked_until) WHERE status = 'processing';
CREATE INDEX IF NOT EXISTS intent_dead_kind
    ON {{schema}}.intent (kind) WHERE status = 'dead';
CREATE UNIQUE INDEX IF NOT EXISTS intent_dedupe_key
    ON {{schema}}.intent (dedupe_key) WHERE dedupe_key IS NOT NULL;

-- The dead intents that halt their ordering key: the lowest row of the key that still blocks
-- it is dead and not skipped. `outbox-worker status` and the dashboard read this; so can you.
CREATE OR REPLACE VIEW {{schema}}.halted_key AS
SELECT d.ordering_key, d.id, d.kind, d.last_error, d.created_at
FROM {{schema}}.intent AS d
WHERE d.ordering_key IS NOT NULL AND d.status = 'dead' AND NOT d.ordering_skipped
  AND NOT EXISTS (SELECT 1 FROM {{schema}}.intent AS b
                  WHERE b.ordering_key = d.ordering_key AND b.id < d.id
                    AND (b.status IN ('pending', 'processing')
                         OR (b.status = 'dead' AND NOT b.ordering_skipped)));

-- One SQL call for producers in any language, inside their own transaction.
-- A second call with the same dedupe_key inserts nothing and returns the first id.
-- The signature without ordering_key goes first: beside the new one, a call that leaves out
-- trailing arguments would be ambiguous.
DROP FUNCTION IF EXISTS {{schema}}.enqueue(text, jsonb, timestamptz, text, integer);
CREATE OR REPLACE FUNCTION {{schema}}.enqueue(
    kind         text,
    payload      jsonb,
    run_at       timestamptz DEFAULT NULL,
    dedupe_key   text        DEFAULT NULL,
    max_attempts integer     DEFAULT NULL,
    ordering_key text        DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO {{schema}}.intent AS i
        (kind, payload, run_at, dedupe_key, max_attempts, ordering_key)
    VALUES (enqueue.kind, enqueue.payload, COALESCE(enqueue.run_at, now()),
            enqueue.dedupe_key, enqueue.max_attempts, enqueue.ordering_key)
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

-- Workers that are idle and waiting for a notification, keyed by the backend pid of their
-- LISTEN connection. The insert trigger notifies only when this table is not empty: under
-- load every worker is busy and will claim again anyway, so producers' commits skip
-- NOTIFY and the server-wide lock it takes at commit. UNLOGGED: nothing here needs to
-- survive a crash (rows of vanished backends are swept by the workers).
CREATE UNLOGGED TABLE IF NOT EXISTS {{schema}}.idle_worker (
    backend_pid integer PRIMARY KEY,
    worker_id   text        NOT NULL,
    since       timestamptz NOT NULL DEFAULT now()
);

-- 010_notify_on_commit.sql
-- Wake idle workers when intents are committed, without making busy producers pay for it.
--
-- A transaction that has issued NOTIFY takes a server-wide lock at commit and holds it
-- through the WAL flush, which serialises every notifying commit. So we notify only when
-- some worker is idle (a row in idle_worker); a busy worker claims again by itself.
--
-- The race between "a worker declares itself idle" and "a producer decides not to notify"
-- is closed with an advisory lock (key: 5236, hashtext(channel)):
--   * the producer checks the flag at commit time (a deferred trigger) while holding the
--     lock in SHARE mode until its commit completes, and notifies anyway if it cannot get
--     that lock at once;
--   * the worker inserts its idle_worker row while taking the lock EXCLUSIVE (waiting out
--     producers that checked before the row existed, whose rows are then visible), and
--     then claims once more before it sleeps.
-- Either the producer sees the flag and notifies, or the worker's last claim sees the row.
-- The poll bounds the worst case if anything else goes wrong.
--
-- Identical notifications in a transaction fold into one, and the transaction-local
-- setting makes only the first row of a transaction do the check: a 10,000-row INSERT
-- costs one check and at most one notification. Insert only: claims and outcome writes
-- never notify.

DROP TRIGGER IF EXISTS intent_notify ON {{schema}}.intent;
DROP FUNCTION IF EXISTS {{schema}}.notify_intent_inserted();

CREATE OR REPLACE FUNCTION {{schema}}.notify_intent_committed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    checked constant text := 'outbox_worker.checked_' || {{channel}};
BEGIN
    IF current_setting(checked, true) = '1' THEN
        RETURN NULL;
    END IF;
    PERFORM set_config(checked, '1', true);
    IF NOT pg_try_advisory_xact_lock_shared(5236, hashtext({{channel}}))
       OR EXISTS (SELECT 1 FROM {{schema}}.idle_worker) THEN
        PERFORM pg_notify({{channel}}, '');
    END IF;
    RETURN NULL;
END;
$$;

CREATE CONSTRAINT TRIGGER intent_notify
    AFTER INSERT ON {{schema}}.intent
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION {{schema}}.notify_intent_committed();

-- 020_ordering_release.sql
-- Ordering keys: when an intent stops holding up its key (sent, dead and skipped, discarded,
-- deleted), the next intent of that key may become claimable. If a worker had marked it
-- `ordering_held` (kept out of the claim's index: see hold_backlog in worker/sql/relay.sql),
-- clear that mark here, in the same transaction as the write that freed the key.
--
-- Why no mark is ever stranded: hold_backlog marks a row only while it holds FOR SHARE on the
-- key's current head and sees that head still blocking. The head's freeing UPDATE (or DELETE)
-- waits for that share lock, and the trigger's statement takes a fresh snapshot after it, so
-- it sees every mark made on the strength of that head. A mark attempted after the head was
-- freed re-checks the head, finds it no longer blocking, and is not made.
--
-- The WHEN clauses keep unordered rows, claims, heartbeats and retries out of PL/pgSQL.

CREATE OR REPLACE FUNCTION {{schema}}.intent_release_next() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {{schema}}.intent AS i SET ordering_held = false
    WHERE i.id = (SELECT b.id FROM {{schema}}.intent AS b
                  WHERE b.ordering_key = OLD.ordering_key
                    AND (b.status IN ('pending', 'processing')
                         OR (b.status = 'dead' AND NOT b.ordering_skipped))
                  ORDER BY b.id LIMIT 1)
      AND i.ordering_held;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS intent_release_next_upd ON {{schema}}.intent;
CREATE TRIGGER intent_release_next_upd
    AFTER UPDATE OF status, ordering_skipped ON {{schema}}.intent
    FOR EACH ROW
    WHEN (OLD.ordering_key IS NOT NULL
          AND (OLD.status IN ('pending', 'processing')
               OR (OLD.status = 'dead' AND NOT OLD.ordering_skipped))
          AND NOT (NEW.status IN ('pending', 'processing')
                   OR (NEW.status = 'dead' AND NOT NEW.ordering_skipped)))
    EXECUTE FUNCTION {{schema}}.intent_release_next();

DROP TRIGGER IF EXISTS intent_release_next_del ON {{schema}}.intent;
CREATE TRIGGER intent_release_next_del
    AFTER DELETE ON {{schema}}.intent
    FOR EACH ROW
    WHEN (OLD.ordering_key IS NOT NULL
          AND (OLD.status IN ('pending', 'processing')
               OR (OLD.status = 'dead' AND NOT OLD.ordering_skipped)))
    EXECUTE FUNCTION {{schema}}.intent_release_next();
