-- Ordering keys: when an intent stops holding up its key (sent, dead and skipped, discarded,
-- deleted), the next intent of that key may become claimable. If a worker had marked it
-- `ordering_held` (kept out of the claim's index: see hold_backlog in worker/store/sql/relay.sql),
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
                  WHERE b.ordering_key = OLD.ordering_key AND {{blocks_key(b)}}
                  ORDER BY b.id LIMIT 1)
      AND i.ordering_held;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS intent_release_next_upd ON {{schema}}.intent;
CREATE TRIGGER intent_release_next_upd
    AFTER UPDATE OF status, ordering_skipped ON {{schema}}.intent
    FOR EACH ROW
    WHEN (OLD.ordering_key IS NOT NULL AND {{blocks_key(OLD)}} AND NOT {{blocks_key(NEW)}})
    EXECUTE FUNCTION {{schema}}.intent_release_next();

DROP TRIGGER IF EXISTS intent_release_next_del ON {{schema}}.intent;
CREATE TRIGGER intent_release_next_del
    AFTER DELETE ON {{schema}}.intent
    FOR EACH ROW
    WHEN (OLD.ordering_key IS NOT NULL AND {{blocks_key(OLD)}})
    EXECUTE FUNCTION {{schema}}.intent_release_next();

COMMENT ON TRIGGER intent_release_next_upd ON {{schema}}.intent IS
    'When an intent stops holding up its ordering key (sent, dead and skipped), clears '
    'ordering_held on the key''s next intent.';
COMMENT ON TRIGGER intent_release_next_del ON {{schema}}.intent IS
    'When an intent that held up its ordering key is deleted, clears ordering_held on the '
    'key''s next intent.';
