-- enqueue() runs with its owner's rights, so a producer needs only EXECUTE on it (and USAGE
-- on the schema), never a grant on the table; the search path is pinned so that nothing a
-- caller creates can stand in for a built-in inside it. A catalog change: no table lock.
ALTER FUNCTION {{schema}}.enqueue(text, jsonb, timestamptz, text, integer, text, jsonb)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
