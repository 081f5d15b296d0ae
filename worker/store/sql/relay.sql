-- Runtime queries of the relay. Each block is one named statement; {{schema}} and
-- {{channel}} are filled in at start-up, values are always bind parameters.

-- name: claim
-- Take up to $3 due rows nobody else holds, lease them to worker $1 for $2 seconds and count
-- the attempt, all in one autocommitted statement: no row lock or transaction outlives it.
-- Kinds in $4 are at their --limits right now and are left for later.
-- `id = ANY(ARRAY(...))` keeps the plan an index scan on large limits, where the usual
-- CTE + UPDATE ... FROM join was seen to turn into a hash join over the whole table.
--
-- Ordering keys: a keyed row is taken only if it is its key's head, i.e. no lower id of the
-- key still blocks (pending, processing, or dead and not skipped), and no row of the key is
-- in flight. Under READ COMMITTED two claimers cannot both take rows of one key: in any one
-- snapshot only the head passes; if a concurrent claim took the head, it is locked (skipped)
-- or already processing (re-checked after the lock), and the second row still sees the head
-- blocking. A retry or a rescue leaves the head pending, so it keeps its place. The unique
-- index intent_ordering_in_flight backs this up in the database itself (a lower id that
-- commits late): then this statement fails, and the claim loop simply claims again.
-- Rows marked ordering_held (known non-heads, see hold_backlog) are not even in the index.
WITH claimed AS (
    UPDATE {{schema}}.intent
    SET status = 'processing',
        attempts = attempts + 1,
        locked_by = $1,
        locked_until = now() + make_interval(secs => $2)
    WHERE id = ANY(ARRAY(
        SELECT r.id FROM {{schema}}.intent AS r
        WHERE r.status = 'pending' AND NOT r.ordering_held
          -- the floor; run_at alone again, or planners without statistics (a new table)
          -- take the row comparison for selective and sort the whole backlog instead
          AND (r.run_at, r.id) >= ($5::timestamptz, $6::bigint) AND r.run_at >= $5
          AND r.run_at <= now() AND r.kind <> ALL($4::text[])
          AND (r.ordering_key IS NULL OR (
              NOT EXISTS (SELECT 1 FROM {{schema}}.intent AS b
                          WHERE b.ordering_key = r.ordering_key AND b.id < r.id
                            AND {{blocks_key(b)}})
              AND NOT EXISTS (SELECT 1 FROM {{schema}}.intent AS f
                              WHERE f.ordering_key = r.ordering_key
                                AND f.status = 'processing')))
        ORDER BY r.run_at, r.id
        LIMIT $3
        FOR UPDATE SKIP LOCKED))
    RETURNING id, kind, payload, attempts, max_attempts, created_at, run_at, ordering_key,
              trace_context
)
-- The floor for the next claim: the first row still pending past this one's floor, in this
-- statement's snapshot (so the rows just claimed are skipped by id), and the statement's
-- now(). The worker keeps the lower of that row and now() less a margin: a producer's row
-- carries run_at = its transaction's start, so one that commits a little after this
-- statement still lands above the floor. A row that lands below it anyway (a transaction
-- open longer than the margin, an explicit run_at in the past, a key released by another
-- worker) waits for the worker's next full scan, one poll interval at most. Without the
-- floor, each claim walks every index entry of the rows claimed since vacuum last ran:
-- under a held xmin horizon, all of them. (No ORDER BY over a union here: the claim
-- connection runs with enable_sort off, and a sort anywhere turned the plan upside down.)
SELECT c.*, next.run_at AS floor_run_at, next.id AS floor_id, now() AS claimed_at
FROM claimed AS c
LEFT JOIN (
    SELECT p.run_at, p.id FROM {{schema}}.intent AS p
    WHERE p.status = 'pending' AND NOT p.ordering_held
      AND (p.run_at, p.id) >= ($5::timestamptz, $6::bigint) AND p.run_at >= $5
      AND p.id <> ALL(ARRAY(SELECT id FROM claimed))
    ORDER BY p.run_at, p.id
    LIMIT 1
) AS next ON true

-- name: hold_backlog
-- Keep blocked rows out of the claim's way: among the first $1 due rows a claim would walk,
-- mark ordering_held the keyed ones that are not their key's head. Without it, a key with a
-- long backlog behind a failing head costs every claim a walk over that whole backlog.
-- A mark is written only while this statement holds a share lock on the head itself (SKIP
-- LOCKED: a head being claimed or written is left for the next pass), so the head's freeing
-- write waits for the mark to commit and its trigger then clears it
-- (triggers/020_ordering_release.sql). Returns how many rows it marked. From the claim's
-- floor ($2, $3), like the claim: the rows below it were walked by the last full scan.
WITH held AS (
    UPDATE {{schema}}.intent AS i SET ordering_held = true
    WHERE i.id = ANY(ARRAY(
        SELECT w.id
        FROM (SELECT id, ordering_key FROM {{schema}}.intent
              WHERE status = 'pending' AND NOT ordering_held AND run_at <= now()
                AND (run_at, id) >= ($2::timestamptz, $3::bigint) AND run_at >= $2
              ORDER BY run_at, id LIMIT $1) AS w
        WHERE w.ordering_key IS NOT NULL
          AND EXISTS (SELECT 1 FROM {{schema}}.intent AS h
                      WHERE h.id = (SELECT b.id FROM {{schema}}.intent AS b
                                    WHERE b.ordering_key = w.ordering_key
                                      AND {{blocks_key(b)}}
                                    ORDER BY b.id LIMIT 1)
                        AND h.id < w.id AND {{blocks_key(h)}}
                      FOR SHARE SKIP LOCKED)))
      AND i.status = 'pending' AND NOT i.ordering_held
    RETURNING 1
)
SELECT count(*) FROM held

-- name: next_due
-- Seconds until the next pending intent falls due, by the database's clock (a probe of
-- the pending index from the claim's floor, $1, $2); NULL when nothing is pending.
SELECT extract(epoch FROM min(run_at) - now())::float8
FROM {{schema}}.intent
WHERE status = 'pending' AND NOT ordering_held
  AND (run_at, id) >= ($1::timestamptz, $2::bigint) AND run_at >= $1

-- name: record_outcomes
-- One fenced write for a batch of outcomes. A row whose lease this worker lost (expired and
-- rescued, or taken by another worker) is left alone and missing from the result.
-- status: 'sent' | 'pending' (retry after delay seconds) | 'dead'; refund: 1 gives back the
-- attempt (released at shutdown, not the intent's fault). $7: --ordering-on-dead continue:
-- a dead keyed intent is written skipped, so its key moves on (the release trigger frees the
-- next one); otherwise it halts its key.
UPDATE {{schema}}.intent AS i
SET status = o.status,
    sent_at = CASE WHEN o.status = 'sent' THEN now() END,
    run_at = CASE WHEN o.status = 'pending' THEN now() + make_interval(secs => o.delay)
                  ELSE i.run_at END,
    attempts = i.attempts - o.refund,
    last_error = COALESCE(o.error, i.last_error),
    ordering_skipped = (o.status = 'dead' AND $7::boolean AND i.ordering_key IS NOT NULL),
    locked_by = NULL,
    locked_until = NULL
FROM unnest($2::bigint[], $3::text[], $4::float8[], $5::text[], $6::int[])
     AS o(id, status, delay, error, refund)
WHERE i.id = o.id AND i.locked_by = $1 AND i.status = 'processing'
RETURNING i.id

-- name: heartbeat
-- Extend the leases of the rows this worker holds: being delivered, or their outcome waiting
-- in its writer's queue. Fenced like record_outcomes (ours, processing): a row whose outcome
-- was recorded first is left alone. A row locked right now (by this worker's outcome write,
-- which locks its batch in completion order) is skipped, not waited for: waiting deadlocked
-- with the writer. Each id comes back with renewed = true, or false if the row is no longer
-- ours (recorded, or lost); a skipped id is absent and judged at the next beat.
WITH renewed AS (
    UPDATE {{schema}}.intent
    SET locked_until = now() + make_interval(secs => $3)
    WHERE id = ANY(ARRAY(
        SELECT id FROM {{schema}}.intent
        WHERE id = ANY($2::bigint[]) AND locked_by = $1 AND status = 'processing'
        FOR UPDATE SKIP LOCKED))
    RETURNING id
)
SELECT id, true AS renewed FROM renewed
UNION ALL
SELECT id, false FROM {{schema}}.intent
WHERE id = ANY($2::bigint[]) AND (locked_by IS DISTINCT FROM $1 OR status <> 'processing')

-- name: rescue_expired
-- Rows whose lease ran out: their worker crashed, hung or lost the database. The claim
-- already counted the attempt, so a message that kills every worker ends dead instead of
-- looping; $1 is the worker's default max_attempts. Not the rows this worker is still
-- delivering ($2): after a network partition longer than the lease their outcome write still
-- lands. Rows it holds without knowing (a claim whose answer was lost) are rescued.
-- A rescued keyed intent stays its key's head (pending keeps its place); $3 is
-- --ordering-on-dead continue, for one that ends dead here.
UPDATE {{schema}}.intent
SET status = CASE WHEN attempts >= COALESCE(max_attempts, $1) THEN 'dead' ELSE 'pending' END,
    last_error = CASE WHEN attempts >= COALESCE(max_attempts, $1)
                      THEN 'attempts exhausted; last one: ' ELSE '' END
                 || 'lease expired while held by ' || locked_by
                 || ' (worker crashed, hung or lost its database connection)',
    ordering_skipped = (attempts >= COALESCE(max_attempts, $1) AND $3::boolean
                        AND ordering_key IS NOT NULL),
    run_at = now(),
    locked_by = NULL,
    locked_until = NULL
WHERE id = ANY(ARRAY(
    SELECT id FROM {{schema}}.intent
    WHERE status = 'processing' AND locked_until < now() AND id <> ALL($2::bigint[])
    ORDER BY locked_until
    LIMIT 1000
    FOR UPDATE SKIP LOCKED))
RETURNING id, status

-- name: notify
SELECT pg_notify({{channel}}, '')

-- name: declare_idle
-- This worker (its LISTEN backend $1) is about to sleep: ask producers to notify. Taking the
-- lock EXCLUSIVE waits for producers that checked the flag before this row existed; the
-- claim that follows sees their rows. See triggers/010_notify_on_commit.sql.
WITH flag AS (
    INSERT INTO {{schema}}.idle_worker (backend_pid, worker_id) VALUES ($1, $2)
    ON CONFLICT (backend_pid) DO NOTHING
)
SELECT pg_advisory_xact_lock({{idle_flag_lock}})

-- name: declare_busy
-- Work is streaming in: producers need not notify on our account.
DELETE FROM {{schema}}.idle_worker WHERE backend_pid = $1

-- name: sweep_idle_workers
-- Flags left by workers whose LISTEN connection is gone (crash, network): without this,
-- producers would keep paying for notifications nobody waits for.
DELETE FROM {{schema}}.idle_worker AS w
WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity AS a WHERE a.pid = w.backend_pid)
