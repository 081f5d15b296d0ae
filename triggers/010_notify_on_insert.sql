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
