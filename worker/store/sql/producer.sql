-- name: enqueue
-- The payload travels as text and is cast by the server, so it works whatever JSON codec
-- the caller's connection has.
SELECT {{schema}}.enqueue($1, $2::text::jsonb, $3, $4, $5, $6, $7::text::jsonb)
