-- Wake idle workers when intents are committed, without making busy producers pay for it.
--
-- A transaction that has issued NOTIFY takes a server-wide lock at commit and holds it
-- through the WAL flush, which serialises every notifying commit. So we notify only when
-- some worker is idle (a row in idle_worker); a busy worker claims again by itself.
--
-- The race between "a worker declares itself idle" and "a producer decides not to notify"
-- is closed with an advisory lock (key: {{idle_flag_lock}}, worker/sqlfiles.py):
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
    IF NOT pg_try_advisory_xact_lock_shared({{idle_flag_lock}})
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

COMMENT ON TRIGGER intent_notify ON {{schema}}.intent IS
    'At commit, once per transaction: NOTIFY the channel when a worker is idle (or when that '
    'cannot be checked without waiting).';
