-- Named queries: each under a `-- name: <name>` header, loaded by outbox/store/database.py.
-- Every statement is whole here: none is assembled from pieces in Python.

-- name: insert_new_messages
-- Many messages in one statement (a batch request, or concurrent single requests
-- coalesced), given as one JSON array, on the assumption that none is a replay: a
-- plain INSERT costs PostgreSQL about a quarter less than one with ON CONFLICT, whose
-- speculative insertion every row pays (EXPLAIN ANALYZE of 1,000 rows: 11.8 ms
-- against 15.9). A client_message_id already taken fails it with a unique violation,
-- and the caller runs insert_messages instead. An ordered message that may have a live
-- earlier one in its conversation (one seen now, an earlier one of the batch, or a send_at
-- ahead, where it takes its place later) gets check_order: the claim checks its order
-- (sql/migrations/017_order_priority_fairness.sql). Requests that overlap in time see
-- nothing of each other: either may go first.
INSERT INTO outbox.messages AS m
    (id, user_id, client_message_id, "to", type, payload, request_hash, max_attempts,
     send_at, expires_at, next_attempt_at, sender, priority, ordered, check_order)
SELECT b.id, b.user_id, b.client_message_id, b."to", b.type, b.payload,
       decode(b.request_hash, 'hex'), b.max_attempts, b.send_at, b.expires_at,
       GREATEST(now(), COALESCE(b.send_at, now())), b.sender, b.priority, b.ordered,
       b.ordered AND (COALESCE(b.send_at > now(), false)
                      OR row_number() OVER (PARTITION BY b.sender, b."to" ORDER BY b.n) > 1
                      OR EXISTS (SELECT FROM outbox.messages e
                                 WHERE e.status IN ('pending', 'in_flight')
                                   AND e.sender = b.sender AND e."to" = b."to" AND e.ordered))
FROM ROWS FROM (jsonb_to_recordset(%(messages)s::jsonb)
        AS (id uuid, user_id text, client_message_id text, "to" text, type text, payload jsonb,
            request_hash text, max_attempts int, send_at timestamptz, expires_at timestamptz,
            sender text, priority smallint, ordered boolean)) WITH ORDINALITY
    AS b(id, user_id, client_message_id, "to", type, payload, request_hash, max_attempts,
         send_at, expires_at, sender, priority, ordered, n)
ORDER BY b.n  -- seq (the column's default) in array order;

-- name: insert_messages
-- insert_new_messages when some rows may be replays: the same INSERT, and per row
-- inserted (the id proposed comes back), replayed (another id comes back: same request
-- under the same client_message_id), or a conflict (nothing comes back for it).
INSERT INTO outbox.messages AS m
    (id, user_id, client_message_id, "to", type, payload, request_hash, max_attempts,
     send_at, expires_at, next_attempt_at, sender, priority, ordered, check_order)
SELECT b.id, b.user_id, b.client_message_id, b."to", b.type, b.payload,
       decode(b.request_hash, 'hex'), b.max_attempts, b.send_at, b.expires_at,
       GREATEST(now(), COALESCE(b.send_at, now())), b.sender, b.priority, b.ordered,
       b.ordered AND (COALESCE(b.send_at > now(), false)
                      OR row_number() OVER (PARTITION BY b.sender, b."to" ORDER BY b.n) > 1
                      OR EXISTS (SELECT FROM outbox.messages e
                                 WHERE e.status IN ('pending', 'in_flight')
                                   AND e.sender = b.sender AND e."to" = b."to" AND e.ordered))
FROM ROWS FROM (jsonb_to_recordset(%(messages)s::jsonb)
        AS (id uuid, user_id text, client_message_id text, "to" text, type text, payload jsonb,
            request_hash text, max_attempts int, send_at timestamptz, expires_at timestamptz,
            sender text, priority smallint, ordered boolean)) WITH ORDINALITY
    AS b(id, user_id, client_message_id, "to", type, payload, request_hash, max_attempts,
         send_at, expires_at, sender, priority, ordered, n)
ORDER BY b.n  -- seq (the column's default) in array order
ON CONFLICT (user_id, client_message_id) WHERE client_message_id IS NOT NULL
DO UPDATE SET updated_at = m.updated_at
    WHERE m.request_hash = EXCLUDED.request_hash
RETURNING m.id::text AS id, m.user_id, m.client_message_id;

-- name: get_message
-- A message as GET shows it, with its attempts (the view: 011_message_views.sql).
SELECT *
FROM outbox.message_view
WHERE id = %(id)s AND (%(user_id)s::text IS NULL OR user_id = %(user_id)s::text);

-- name: cancel_message
-- The cancel and its `message_cancelled` event (sql/migrations/007_cancel_event.sql).
SELECT id FROM outbox.cancel_message(%(id)s, %(user_id)s::text) AS id;

-- name: schema_version
SELECT COALESCE(max(version), 0) FROM outbox.schema_migrations;

-- name: list_messages
-- Keyset pagination, newest first (ids are UUIDv7, so id order is creation order).
-- Run unprepared so the planner folds away the filters that are NULL. No index has the
-- sender: its filter is applied on top of the plan the other filters choose.
-- ?delivery=: %(delivery_state)s, the column's value of delivered, read or failed (the
-- partial indexes messages_user_delivery and messages_delivery hold exactly the rows with
-- a receipt); %(accepted)s: sent without a receipt yet, read from the sent range.
SELECT *
FROM outbox.listed_message
WHERE (%(user_id)s::text IS NULL OR user_id = %(user_id)s::text)
  AND (%(status)s::text IS NULL OR status = %(status)s::text)
  AND (%(client_message_id)s::text IS NULL OR client_message_id = %(client_message_id)s::text)
  AND (%(sender)s::text IS NULL OR sender = %(sender)s::text)
  AND (%(priority)s::text IS NULL OR priority = %(priority)s::text)
  AND (%(delivery_state)s::smallint IS NULL OR delivery_state = %(delivery_state)s::smallint)
  AND (NOT %(accepted)s::boolean OR (status = 'sent' AND delivery_state IS NULL))
  AND (%(after)s::uuid IS NULL OR id < %(after)s::uuid)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: claim_messages
-- One statement claims a batch, sender by sender, each within its limits:
-- 1. `heads`: the senders that have pending rows, each with the due time of its first
--    one: a skip scan of messages_sender_due (one index descent per sender).
-- 2. `senders`: each as this statement's snapshot sees its state (outbox.sender_state; no
--    row: unlimited and active), with its effective rate now.
-- 3. `ready`: those with a due row that may send now: active and, when limited, with a
--    token in their bucket; or paused by their breaker past its period with no probe
--    out (one message then goes, as the probe). The oldest heads get a share of the
--    claim each: equal shares of at least 32 rows (one more for the oldest), so that no
--    sender's backlog holds back another's rows, and a claim of a few hundred rows over
--    many senders visits a few of them (each visit is an index descent); those left out
--    come first in the next claim, which follows at once (`more`).
-- 4. `guards`: the state of the limited and probing ones, locked (FOR NO KEY UPDATE SKIP
--    LOCKED: a sender whose state another claim holds is left to that claim) and read
--    again as it is now, with the tokens it holds now.
-- 5. `walk`: each granted sender's users with due rows, by priority (strict: high first),
--    and within one, round-robin from the user this dispatcher's last claim served last
--    there (%(cursors)s); each takes its due rows up to what is left of the sender's
--    allowance (and of its room under %(user_max)s, OUTBOX_USER_MAX_IN_FLIGHT). `due`
--    locks those rows, oldest first, rows that another dispatcher is claiming skipped
--    (FOR UPDATE SKIP LOCKED).
-- 6. Order (sql/migrations/017_order_priority_fairness.sql): a row marked check_order whose
--    conversation has a live earlier ordered message is parked behind it (`parked`), that
--    message locked FOR SHARE so that its finalisation, which releases the next, waits for
--    this claim; the others are claimed as the UPDATE always did (by ctid, a TID scan: see
--    below), and `spent` takes the tokens (or records the probe) in the same statement.
-- The UPDATE finds the rows it locked by their ctid: no join back to the table, whose
-- plan, by statistics, could be a hash join over a sequential scan of every row. A
-- locked row cannot move, but one that another transaction changed after this
-- statement's snapshot was taken (a replay touches its row) is locked in its newer
-- version, which this snapshot cannot see: it stays pending, and is claimed next time.
-- One more row, its id NULL, says when a row may next be claimed, after a claim that got
-- fewer than it asked for: per sender its next pending row's due time, but not before its
-- bucket holds the tokens worth waking for (a fifth of a second's worth, or its whole
-- capacity if smaller: each dispatcher claims a limited sender's backlog about five
-- times a second, whatever its rate) or, when paused by its breaker, before the probe
-- may go; a sender paused by hand never (its resume wakes the dispatchers). A time
-- already past: a due row another session holds. `more` says that a sender took its
-- whole share, that senders with due rows were left out, that rows were parked, or that
-- a walk ran out of steps: claim again at once. `cursors`: per sender, the last user its
-- walk visited, where the next claim's walk starts.
-- %(now)s is the claim's clock, the database's own when NULL (tests set it to claim as
-- of another time); %(burst)s is OUTBOX_SENDER_BURST; %(paced)s the call slots
-- free now, which a limited sender's rows may not outnumber. The claimed rows' columns
-- are the fields of Claimed (outbox/store/queue.py), in order (`probe`: the one row of a
-- paused sender that goes as its breaker's probe; `paced`: a row that took a token or is
-- a probe, which the dispatcher starts first), then next_due_at, more and cursors.
WITH RECURSIVE clock AS MATERIALIZED (
    SELECT COALESCE(%(now)s::timestamptz, now()) AS now
),
heads AS (
    (SELECT sender, next_attempt_at AS head
     FROM outbox.messages
     WHERE status = 'pending' AND NOT held
     ORDER BY sender, next_attempt_at
     LIMIT 1)
    UNION ALL
    SELECT n.sender, n.head
    FROM heads h
    CROSS JOIN LATERAL (
        SELECT sender, next_attempt_at AS head
        FROM outbox.messages
        WHERE status = 'pending' AND NOT held AND sender > h.sender
        ORDER BY sender, next_attempt_at
        LIMIT 1) n
),
rates AS MATERIALIZED (
    SELECT h.sender AS id, h.head, st.paused IS NULL AS active, st.probe_at, st.probe_until,
           st.tokens, st.refilled_at,
           outbox.sender_rate(st.rate_limit, st.learned_limit, st.decreased_rate,
                              st.decreased_at, c.now) AS rate
    FROM heads h
    CROSS JOIN clock c
    LEFT JOIN outbox.sender_state st ON st.id = h.sender
),
senders AS MATERIALIZED (
    SELECT r.*,
           CASE WHEN r.rate IS NOT NULL
                THEN outbox.sender_tokens(r.tokens, r.refilled_at, r.rate, %(burst)s,
                                          (SELECT now FROM clock))
           END AS tokens_now
    FROM rates r
),
ready AS (
    SELECT r.id, r.guarded,
           CASE WHEN r.rank <= r.k
                THEN %(limit)s / r.k + CASE WHEN r.rank <= mod(%(limit)s, r.k) THEN 1 ELSE 0 END
                ELSE 0
           END AS share
    FROM (
        SELECT s.id, s.rate IS NOT NULL OR NOT s.active AS guarded,
               LEAST(count(*) OVER (), GREATEST(1, %(limit)s / 32)) AS k,
               row_number() OVER (ORDER BY s.head, s.id) AS rank
        FROM senders s
        WHERE s.head <= (SELECT now FROM clock)
          AND CASE WHEN s.active THEN s.rate IS NULL OR s.tokens_now >= 1
                   ELSE s.probe_at <= (SELECT now FROM clock)
                        AND (s.probe_until IS NULL OR s.probe_until < (SELECT now FROM clock))
              END
    ) r
),
guards AS (
    SELECT st.id, st.paused IS NOT NULL AS probe,
           outbox.sender_tokens(
               st.tokens, st.refilled_at,
               outbox.sender_rate(st.rate_limit, st.learned_limit, st.decreased_rate,
                                  st.decreased_at, (SELECT now FROM clock)),
               %(burst)s, (SELECT now FROM clock)) AS tokens
    FROM outbox.sender_state st
    WHERE st.id IN (SELECT id FROM ready WHERE guarded AND share > 0)
      AND (st.paused IS NULL
           OR (st.probe_at <= (SELECT now FROM clock)
               AND (st.probe_until IS NULL OR st.probe_until < (SELECT now FROM clock))))
    FOR NO KEY UPDATE OF st SKIP LOCKED
),
grants AS (
    SELECT r.id, r.share, r.guarded, COALESCE(g.probe, false) AS probe,
           CASE WHEN NOT r.guarded THEN r.share
                WHEN g.probe THEN LEAST(r.share, 1)
                -- A limited sender's rows only for the call slots free now (%(paced)s): a
                -- row claimed with its token must start now, not with the next second's.
                ELSE LEAST(r.share, %(paced)s, floor(LEAST(g.tokens, r.share))::int)
           END AS allowance
    FROM ready r
    LEFT JOIN guards g ON g.id = r.id
    WHERE r.share > 0 AND (NOT r.guarded OR g.id IS NOT NULL)
),
-- The walk: each granted sender's users, round-robin. Priorities in order (0 high first);
-- within one, the users after this dispatcher's cursor for that sender (%(cursors)s, the
-- last user its previous claim served there), then, a second lap, those up to it; each
-- user takes its due rows up to what is left of the sender's allowance (and, under
-- %(user_max)s, its room in flight). A row per step: `real` ones are users, the others
-- move to the next lap or priority; at most 64 users per priority and sender.
-- Under %(user_max)s: each user's rows in flight, as one object (a lookup per user).
busy AS MATERIALIZED (
    SELECT COALESCE(jsonb_object_agg(b.user_id, b.n), '{}') AS n
    FROM (SELECT m.user_id, count(*) AS n
          FROM outbox.messages m
          WHERE %(user_max)s::int IS NOT NULL AND m.status = 'in_flight'
          GROUP BY m.user_id) b
),
walk AS (
    SELECT g.id AS sender, 0::smallint AS priority, 0 AS lap,
           %(cursors)s::jsonb ->> g.id AS user_id, g.allowance AS remaining, 0::bigint AS n,
           0 AS steps, 0 AS pstep, false AS real
    FROM grants g
    WHERE g.allowance > 0
    UNION ALL
    SELECT w.sender, nx.priority, nx.lap, nx.user_id, w.remaining - nx.n, nx.n, w.steps + 1,
           nx.pstep, nx.real
    FROM walk w
    CROSS JOIN LATERAL (
        (SELECT w.priority, w.lap, u.user_id,
                CASE WHEN u.head > (SELECT now FROM clock) THEN 0  -- nothing due yet
                     ELSE LEAST(
                         (SELECT count(*)
                          FROM (SELECT FROM outbox.messages c
                                WHERE c.status = 'pending' AND NOT c.held
                                  AND c.sender = w.sender AND c.priority = w.priority
                                  AND c.user_id = u.user_id
                                  AND c.next_attempt_at <= (SELECT now FROM clock)
                                ORDER BY c.next_attempt_at  -- messages_claim's order
                                LIMIT w.remaining) x),
                         GREATEST(0, COALESCE(
                             %(user_max)s::int - COALESCE(((SELECT n FROM busy) ->> u.user_id)::int, 0),
                             w.remaining)))
                END AS n,
                w.pstep + 1 AS pstep, true AS real
         -- The next user (a JWT sub is never empty: '' is before them all), as an index
         -- condition: never a read through one user's rows; with its first row's due time.
         FROM (SELECT m.user_id, m.next_attempt_at AS head
               FROM outbox.messages m
               WHERE m.status = 'pending' AND NOT m.held AND m.sender = w.sender
                 AND m.priority = w.priority AND m.user_id > COALESCE(w.user_id, '')
               ORDER BY m.sender, m.priority, m.user_id, m.next_attempt_at
               LIMIT 1) u
         WHERE w.pstep < 64 AND (w.lap = 0 OR u.user_id <= %(cursors)s::jsonb ->> w.sender))
        UNION ALL
        (SELECT w.priority, 1, NULL::text, 0::bigint, w.pstep, false
         WHERE w.pstep < 64 AND w.lap = 0 AND %(cursors)s::jsonb ? w.sender)
        UNION ALL
        -- The next priority: after this one's users, or after 64 of them (users whose rows
        -- are not due yet would otherwise hold the walk there).
        (SELECT (w.priority + 1)::smallint, 0, %(cursors)s::jsonb ->> w.sender, 0::bigint, 0,
                false
         WHERE w.priority < 2)
        LIMIT 1) nx
    WHERE w.remaining > 0
),
-- Each user's due rows, oldest first, rows that another dispatcher is claiming skipped.
due AS (
    SELECT d.*, w.priority AS rank_priority, w.steps AS rank_step
    FROM walk w
    CROSS JOIN LATERAL (
        SELECT m.ctid, m.id, m.sender, m.user_id, m."to", m.ordered, m.check_order,
               m.order_at, m.seq, m.next_attempt_at
        FROM outbox.messages m
        WHERE m.status = 'pending' AND NOT m.held AND m.sender = w.sender
          AND m.priority = w.priority AND m.user_id = w.user_id
          AND m.next_attempt_at <= (SELECT now FROM clock)
        ORDER BY m.sender, m.priority, m.user_id, m.next_attempt_at  -- messages_claim's order
        LIMIT w.n
        FOR UPDATE OF m SKIP LOCKED) d
    WHERE w.real AND w.n > 0
),
-- Order: a row that may have a live earlier message in its conversation looks for the
-- last one (as this statement's snapshot sees it; a row of this claim counts).
checked AS (
    SELECT d.*, p.id AS before_id
    FROM due d
    LEFT JOIN LATERAL (
        SELECT e.id
        FROM outbox.messages e
        WHERE d.check_order
          AND e.status IN ('pending', 'in_flight') AND e.sender = d.sender
          AND e."to" = d."to" AND e.ordered AND (e.order_at, e.seq) < (d.order_at, d.seq)
        ORDER BY e.order_at DESC, e.seq DESC
        LIMIT 1) p ON true
),
-- Those earlier messages, locked while still live: their finalisation then waits for
-- this claim, and its release sees the rows parked behind them. One being finalised or
-- claimed now is skipped: its followers stay as they are, for the next claim.
before AS (
    SELECT e.id
    FROM outbox.messages e
    WHERE e.id = ANY (ARRAY(SELECT before_id FROM checked WHERE before_id IS NOT NULL))
      AND e.status IN ('pending', 'in_flight')
    FOR SHARE OF e SKIP LOCKED
),
-- A user's rows beyond %(user_max)s in flight wait (its rows of several senders or
-- priorities in one claim counted together).
decided AS (
    SELECT c.ctid, c.before_id IS NOT NULL AS park,
           c.before_id IS NULL
           AND (%(user_max)s::int IS NULL
                OR COALESCE(((SELECT n FROM busy) ->> c.user_id)::int, 0)
                   + count(*) FILTER (WHERE c.before_id IS NULL) OVER (
                         PARTITION BY c.user_id ORDER BY c.rank_priority, c.rank_step,
                                                         c.next_attempt_at, c.seq)
                   <= %(user_max)s::int) AS go
    FROM checked c
    WHERE c.before_id IS NULL OR c.before_id IN (SELECT id FROM before)
),
parked AS (
    UPDATE outbox.messages m
    SET held = true
    WHERE m.ctid = ANY (ARRAY(SELECT ctid FROM decided WHERE park))
    RETURNING m.sender
),
claimed AS (
    UPDATE outbox.messages m
    SET status = 'in_flight',
        attempts = m.attempts + 1,
        locked_by = %(dispatcher)s,
        locked_until = (SELECT now FROM clock) + make_interval(secs => %(lease_seconds)s),
        updated_at = (SELECT now FROM clock)
    WHERE m.ctid = ANY (ARRAY(SELECT ctid FROM decided WHERE go))
    RETURNING m.id, m.user_id, m."to", m.type, m.payload, m.client_message_id, m.attempts,
              m.max_attempts, m.expires_at, m.sender, m.throttles, m.updated_at AS claimed_at,
              m.priority
),
fetched AS (
    SELECT sender, count(*) AS n FROM due GROUP BY sender
),
taken AS (
    SELECT sender, count(*) AS n, (array_agg(id))[1] AS first_id
    FROM claimed
    GROUP BY sender
),
spent AS (
    UPDATE outbox.sender_state st
    SET tokens = CASE WHEN g.probe THEN st.tokens ELSE COALESCE(g.tokens - t.n, st.tokens) END,
        -- Never back: a claim whose clock is older than a claim committed before it
        -- (its statement began first, reached the lock later) got no refill, and must
        -- not give the next one the time between them again.
        refilled_at = CASE WHEN g.probe THEN st.refilled_at
                           ELSE GREATEST(st.refilled_at, (SELECT now FROM clock)) END,
        probe_id = CASE WHEN g.probe THEN t.first_id ELSE st.probe_id END,
        probe_until = CASE WHEN g.probe
                           THEN (SELECT now FROM clock) + make_interval(secs => %(lease_seconds)s)
                           ELSE st.probe_until END
    FROM guards g
    JOIN taken t ON t.sender = g.id
    WHERE st.id = g.id
),
wake AS (
    SELECT CASE
               WHEN next.head IS NULL THEN NULL
               WHEN s.active AND s.rate IS NULL THEN next.head
               WHEN s.active THEN GREATEST(
                   next.head,
                   (SELECT now FROM clock) + make_interval(secs => GREATEST(0,
                       LEAST(GREATEST(1, s.rate * %(burst)s), GREATEST(1, s.rate * 0.2))
                       -- Tokens left: this claim's count; a sender whose state another
                       -- claim held had tokens that claim takes; else as the snapshot saw.
                       - COALESCE(g.tokens - COALESCE(t.n, 0), CASE WHEN s.tokens_now >= 1 THEN 0 ELSE s.tokens_now END))
                       / s.rate))
               WHEN s.probe_at IS NOT NULL
                   THEN GREATEST(next.head, s.probe_at, s.probe_until)
           END AS at
    FROM senders s
    LEFT JOIN taken t ON t.sender = s.id
    LEFT JOIN guards g ON g.id = s.id AND NOT g.probe
    CROSS JOIN LATERAL (
        SELECT CASE WHEN t.n IS NULL THEN s.head
                    ELSE (SELECT m.next_attempt_at
                          FROM outbox.messages m
                          WHERE m.status = 'pending' AND NOT m.held AND m.sender = s.id
                            AND m.id NOT IN (SELECT id FROM claimed)
                          ORDER BY m.sender, m.next_attempt_at
                          LIMIT 1)
               END AS head) next
)
SELECT c.id, c.user_id, c."to", c.type, c.payload, c.client_message_id, c.attempts AS attempt,
       c.max_attempts, c.expires_at, c.sender, c.throttles, g.probe, g.guarded AS paced,
       c.claimed_at, c.priority, NULL::timestamptz AS next_due_at, NULL::boolean AS more,
       NULL::jsonb AS cursors
FROM claimed c
JOIN grants g ON g.id = c.sender  -- one hash join, not a lookup per row
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL,
       CASE WHEN (SELECT count(*) FROM claimed) < %(limit)s
            THEN (SELECT min(at) FROM wake)
       END,
       EXISTS (SELECT FROM grants g JOIN fetched t ON t.sender = g.id
               WHERE NOT g.probe AND t.n >= g.share)
       OR (%(limit)s > 0 AND EXISTS (SELECT FROM ready WHERE share = 0))
       OR EXISTS (SELECT FROM parked)
       -- A walk cut short after 64 users of one priority that took rows: more may be due.
       OR (EXISTS (SELECT FROM walk w WHERE w.pstep >= 64 AND w.remaining > 0)
           AND EXISTS (SELECT FROM due)),
       (SELECT jsonb_object_agg(v.sender, v.user_id)
        FROM (SELECT DISTINCT ON (w.sender) w.sender, w.user_id
              FROM walk w
              WHERE w.real
              ORDER BY w.sender, w.steps DESC) v);

-- name: expire_pending
-- Pending messages whose expires_at has passed end `error` "expired" (the reaper's round;
-- sql/migrations/016_sender_limits.sql).
SELECT outbox.expire_pending(%(limit)s::int);

-- name: release_stranded
-- Parked rows that nothing would release, released (the reaper's round; the safety net of
-- sql/migrations/017_order_priority_fairness.sql): up to %(limit)s conversations after
-- (%(sender)s, %(to)s); the last one visited (NULLs: the end was reached) and the count.
SELECT last_sender, last_to, released
FROM outbox.release_stranded(%(sender)s::text, %(to)s::text, %(limit)s::int);

-- name: set_sender_limit
-- A sender's configured limit in its state (the dispatchers write `default`'s, which the
-- environment sets): a change starts its rate again at the limit.
SELECT outbox.set_sender_limit(%(id)s::text, %(rate_limit)s::double precision);

-- name: complete_attempts
-- Batched completion, with its events and one NOTIFY (sql/migrations/003_events.sql).
SELECT outbox.complete_attempts(%(outcomes)s::json, %(dispatcher)s);

-- name: record_late_successes
-- The successes complete_attempts did not apply: recorded when their attempt was reaped
-- and no later one has started (sql/migrations/010_late_success.sql).
SELECT outbox.record_late_successes(%(outcomes)s::json, %(dispatcher)s);

-- name: reap_expired_leases
-- Rows in `keep` are this dispatcher's own, their outcome still on its way.
SELECT outbox.reap_expired_leases(%(limit)s::int, %(keep)s::uuid[]);

-- Purge and schedule -----------------------------------------------------------------

-- name: purge_cutoffs
-- The cutoffs of one purge run, fixed once from the purge's clock: %(now)s, the
-- database's own when NULL (tests set it to purge as of another time); NULL keeps.
SELECT CASE WHEN %(error_seconds)s::float8 > 0
            THEN COALESCE(%(now)s::timestamptz, now())
                 - make_interval(secs => %(error_seconds)s) END AS errored,
       CASE WHEN %(sent_seconds)s::float8 > 0
            THEN COALESCE(%(now)s::timestamptz, now())
                 - make_interval(secs => %(sent_seconds)s) END AS done,
       CASE WHEN %(event_seconds)s::float8 > 0
            THEN COALESCE(%(now)s::timestamptz, now())
                 - make_interval(secs => %(event_seconds)s) END AS events;

-- name: purge_counts
-- What a purge with these cutoffs would delete: the columns of PurgeCounts.
SELECT errored, done AS sent, events
FROM outbox.purge_counts(%(errored)s, %(done)s, %(events)s);

-- name: purge_errored_batch
SELECT outbox.purge_errored_batch(%(cutoff)s, %(batch_size)s);

-- name: purge_done_batch
SELECT outbox.purge_done_batch(%(cutoff)s, %(batch_size)s);

-- name: purge_events_batch
SELECT outbox.purge_events_batch(%(cutoff)s, %(batch_size)s);

-- name: try_job_lock
-- Session-level: held for the whole run, released by job_unlock or the connection's end.
SELECT pg_try_advisory_lock(%(namespace)s, hashtext(%(job)s));

-- name: job_unlock
SELECT pg_advisory_unlock(%(namespace)s, hashtext(%(job)s));

-- name: last_job_tick
SELECT max(tick) FROM outbox.job_runs WHERE job = %(job)s;

-- name: insert_job_run
-- Before the work: whoever inserts the row runs the tick, everyone else skips it.
INSERT INTO outbox.job_runs (job, tick, runner, finished_at, rows, detail)
VALUES (%(job)s, %(tick)s, %(runner)s, %(finished_at)s, %(rows)s, %(detail)s)
ON CONFLICT (job, tick) DO NOTHING
RETURNING tick;

-- name: finish_job_run
UPDATE outbox.job_runs
SET finished_at = now(), rows = %(rows)s, detail = %(detail)s
WHERE job = %(job)s AND tick = %(tick)s;

-- name: pg_cron_installed
SELECT to_regclass('cron.job') IS NOT NULL;

-- name: pg_cron_job
-- Our job in pg_cron, if it is registered for this database.
SELECT jobid, schedule, command, active
FROM cron.job
WHERE jobname = %(name)s AND database = current_database();

-- name: queue_summary
SELECT status, count, oldest, due_now FROM outbox.queue_summary;

-- Live status feed -------------------------------------------------------------------

-- name: max_event_id
-- Where a gateway starts following (backward scan of the primary key).
SELECT max(id) FROM outbox.events;

-- name: events_after
-- The next page of events, all users (the gateway's one reader, and admins' replay).
-- Ids become visible in id order (the event lock), so `id > last` never skips one.
SELECT id, user_id, sender, event, data
FROM outbox.events
WHERE id > %(after)s
ORDER BY id
LIMIT %(limit)s;

-- name: user_events_after
-- One user's page of events, for a resuming client: its messages' (events_user_id
-- (user_id, id)) and the sender events of %(senders)s, the senders it may use (the few
-- events of events_sender_events, filtered). Each branch is an ordered index scan that
-- stops at a page: a Merge Append of the two, cut at a page.
SELECT id, user_id, sender, event, data
FROM (
    (SELECT id, user_id, sender, event, data
     FROM outbox.events
     WHERE user_id = %(user_id)s AND id > %(after)s
     ORDER BY id
     LIMIT %(limit)s)
    UNION ALL
    (SELECT id, user_id, sender, event, data
     FROM outbox.events
     WHERE message_id IS NULL AND id > %(after)s AND sender = ANY (%(senders)s::text[])
     ORDER BY id
     LIMIT %(limit)s)
) page
ORDER BY id
LIMIT %(limit)s;

-- name: oldest_event_id
-- The oldest id still kept; on an empty table the one after the newest ever purged, so
-- a resume point before a purge that emptied the table is still recognised (and one
-- after it is not, whatever ids transactions not yet committed have taken).
SELECT COALESCE(
    (SELECT min(id) FROM outbox.events),
    (SELECT through + 1 FROM outbox.events_purged));

-- Admin: dashboard and retry ---------------------------------------------------------

-- name: admin_summary
-- The dashboard's figures as one JSON document, one round trip, from the inspection
-- views. Per status the columns of `queue_summary`, but read so that the cost stays
-- bounded on a big table (the view's exact `sent` count reads every sent row):
-- pending, in-flight and errored rows are counted from their partial indexes (index
-- only) and each count stops after %(cap)s + 1 rows; pending rows due are counted on
-- their own (the pending index is led by the sender: its rows are not in due order),
-- the oldest is the least of each sender's first (a skip scan of messages_sender_due),
-- in-flight ones read by lease keep `due_now` exact below the cap. Sent and cancelled
-- rows share one index that lacks their status, so they are read together, oldest
-- finished first, at most %(done_cap)s + 1 rows: past that, both counts are lower bounds.
-- The delivery funnel: the figures of the view outbox.delivery_funnel per sender over its
-- last 24 hours (the hour 23 hours before this one, on), read here from the sent rows of
-- that window in messages_done_finished, newest first, at most %(done_cap)s of them (the
-- view, filtered on `hour`, would read every sent row: its hour is computed), and with
-- the medians of the whole window, which its hourly ones cannot give.
WITH RECURSIVE heads AS (
    (SELECT sender, next_attempt_at AS head
     FROM outbox.messages
     WHERE status = 'pending' AND NOT held
     ORDER BY sender, next_attempt_at
     LIMIT 1)
    UNION ALL
    SELECT n.sender, n.head
    FROM heads h
    CROSS JOIN LATERAL (
        SELECT sender, next_attempt_at AS head
        FROM outbox.messages
        WHERE status = 'pending' AND NOT held AND sender > h.sender
        ORDER BY sender, next_attempt_at
        LIMIT 1) n
), pending AS (
    SELECT 1 FROM (SELECT FROM outbox.messages WHERE status = 'pending' AND NOT held
                   UNION ALL
                   SELECT FROM outbox.messages WHERE held AND status = 'pending') p
    LIMIT %(cap)s + 1
), pending_due AS (
    SELECT 1 FROM outbox.messages
    WHERE status = 'pending' AND NOT held AND next_attempt_at <= now() LIMIT %(cap)s + 1
), in_flight AS (
    SELECT locked_until AS at FROM outbox.messages
    WHERE status = 'in_flight' ORDER BY locked_until LIMIT %(cap)s + 1
), error AS (
    SELECT finished_at AS at FROM outbox.messages
    WHERE status = 'error' ORDER BY finished_at LIMIT %(cap)s + 1
), done AS (
    SELECT status, finished_at AS at FROM outbox.messages
    WHERE status IN ('sent', 'cancelled') ORDER BY finished_at LIMIT %(done_cap)s + 1
), counts AS (
    SELECT 'pending' AS status, count(*) AS n, count(*) > %(cap)s AS capped, %(cap)s AS cap,
           (SELECT min(head) FROM heads) AS oldest, (SELECT count(*) FROM pending_due) AS due_now
    FROM pending
    UNION ALL
    SELECT 'in_flight', count(*), count(*) > %(cap)s, %(cap)s, min(at),
           count(*) FILTER (WHERE at < now())
    FROM in_flight
    UNION ALL
    SELECT 'error', count(*), count(*) > %(cap)s, %(cap)s, min(at), 0 FROM error
    UNION ALL
    SELECT s.status, count(d.at), (SELECT count(*) FROM done) > %(done_cap)s, %(done_cap)s,
           min(d.at), 0
    FROM (VALUES ('sent'), ('cancelled')) AS s(status)
    LEFT JOIN done d ON d.status = s.status
    GROUP BY s.status
), window_start AS (
    SELECT date_trunc('hour', now()) - interval '23 hours' AS since
), accepted AS (
    SELECT m.sender, m.finished_at, m.delivery_state, m.delivered_at, m.read_at
    FROM outbox.messages m
    WHERE m.status = 'sent' AND m.finished_at >= (SELECT since FROM window_start)
    ORDER BY m.finished_at DESC
    LIMIT %(done_cap)s + 1
), funnel AS (
    SELECT * FROM accepted ORDER BY finished_at DESC LIMIT %(done_cap)s
)
SELECT json_build_object(
    'generated_at', outbox.wire_time(now()),
    'counts', (
        SELECT json_object_agg(status, json_build_object(
                   'count', LEAST(n, cap), 'capped', capped, 'cap', cap,
                   'oldest', outbox.wire_time(oldest), 'due_now', LEAST(due_now, cap)))
        FROM counts),
    'throughput', (
        SELECT COALESCE(json_agg(json_build_object(
                   'minute', outbox.wire_time(minute), 'sent', sent, 'failed', failed)
                   ORDER BY minute), '[]')
        FROM outbox.throughput),
    'provider_latency', (
        SELECT COALESCE(json_agg(json_build_object(
                   'minute', outbox.wire_time(minute), 'calls', calls, 'p50_ms', p50_ms,
                   'p95_ms', p95_ms, 'p99_ms', p99_ms, 'max_ms', max_ms)
                   ORDER BY minute), '[]')
        FROM outbox.provider_latency),
    'recent_failures', (
        SELECT COALESCE(json_agg(json_build_object(
                   'task_id', id, 'user_id', user_id, 'to', "to", 'type', type,
                   'attempts', attempts, 'max_attempts', max_attempts,
                   'finished_at', outbox.wire_time(finished_at), 'last_error', last_error,
                   'last_outcome', last_outcome, 'sender', sender)
                   ORDER BY finished_at DESC), '[]')
        FROM (SELECT * FROM outbox.recent_failures LIMIT %(rows)s) f),
    'waiting', (
        SELECT COALESCE(json_agg(json_build_object(
                   'task_id', id, 'user_id', user_id, 'to', "to", 'type', type,
                   'attempts', attempts, 'max_attempts', max_attempts,
                   'next_attempt_at', outbox.wire_time(next_attempt_at),
                   'created_at', outbox.wire_time(created_at), 'sender', sender)
                   ORDER BY next_attempt_at), '[]')
        FROM (SELECT w.*
              FROM heads h
              CROSS JOIN LATERAL (
                  SELECT * FROM outbox.messages m
                  WHERE m.status = 'pending' AND NOT m.held AND m.sender = h.sender
                  ORDER BY m.sender, m.next_attempt_at
                  LIMIT %(rows)s) w
              ORDER BY w.next_attempt_at
              LIMIT %(rows)s) w),
    'delivery_funnel', (
        SELECT json_build_object(
                   'since', outbox.wire_time(CASE WHEN c.capped THEN c.oldest ELSE w.since END),
                   'capped', c.capped,
                   'cap', %(done_cap)s,
                   'senders', (
                       SELECT COALESCE(json_agg(json_build_object(
                                  'sender', sender, 'accepted', accepted,
                                  'delivered', delivered, 'read', read, 'failed', failed,
                                  'median_seconds_to_delivered', median_seconds_to_delivered,
                                  'median_seconds_to_read', median_seconds_to_read)
                                  ORDER BY sender), '[]')
                       FROM (SELECT f.sender,
                                    count(*) AS accepted,
                                    count(f.delivered_at) AS delivered,
                                    count(f.read_at) AS read,
                                    count(*) FILTER (WHERE f.delivery_state = 1) AS failed,
                                    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(
                                        epoch FROM f.delivered_at - f.finished_at))
                                        AS median_seconds_to_delivered,
                                    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(
                                        epoch FROM f.read_at - f.finished_at))
                                        AS median_seconds_to_read
                             FROM funnel f
                             GROUP BY f.sender) s))
        FROM window_start w,
             (SELECT (SELECT count(*) FROM accepted) > %(done_cap)s AS capped,
                     (SELECT min(finished_at) FROM funnel) AS oldest) c)
)::text;

-- name: retry_message
-- An errored or cancelled message back to pending with a fresh budget, its event and
-- the dispatchers' wake-up (sql/migrations/004_admin_retry.sql); the view of the row
-- as it is now, or no row when it was not retried (011_message_views.sql). Only while
-- its sender exists (`default`, the environment's, or a stored one): a message whose
-- sender was deleted is left as it is. The filter applies to the scan of the message,
-- and the function, the inner side of the lateral join, is called only for a row that
-- passed it.
SELECT r.*
FROM outbox.messages m
CROSS JOIN LATERAL outbox.retry_message_view(m.id, %(budget)s) AS r
WHERE m.id = %(id)s
  AND (m.sender = 'default' OR EXISTS (SELECT FROM outbox.senders s WHERE s.id = m.sender));

-- name: sender_exists
-- Whether a message may name this sender: `default` (the environment's, never stored)
-- or a stored one.
SELECT %(id)s::text = 'default'
       OR EXISTS (SELECT FROM outbox.senders WHERE id = %(id)s::text) AS sender_exists;

-- Metrics -----------------------------------------------------------------------------

-- name: queue_gauges
-- The Prometheus queue gauges (outbox/metrics.py), read at most once per
-- OUTBOX_METRICS_CACHE. Exact where a partial index keeps it cheap whatever the size of
-- the history: pending rows through messages_sender_due (parked ones through messages_held;
-- they are not due), in-flight rows through messages_lease
-- (live rows only, index-only scans). Sent, error and cancelled rows are most of a big
-- table: their counts are estimated from the planner's statistics instead, as of the
-- last (auto)ANALYZE: a catalogue lookup (outbox/store/figures.py does the arithmetic).
-- The columns are the fields of GaugeRow (outbox/store/figures.py).
WITH pending AS (
    SELECT count(*) + (SELECT count(*) FROM outbox.messages WHERE held AND status = 'pending')
               AS count,
           count(*) FILTER (WHERE next_attempt_at <= now()) AS due,
           GREATEST(0, COALESCE(EXTRACT(epoch FROM now() - min(next_attempt_at)), 0))::float8
               AS oldest_due_age
    FROM outbox.messages WHERE status = 'pending' AND NOT held
), in_flight AS (
    SELECT count(*) AS count, count(*) FILTER (WHERE locked_until < now()) AS expired
    FROM outbox.messages WHERE status = 'in_flight'
)
SELECT p.count AS pending, p.due, p.oldest_due_age, f.count AS in_flight,
       f.expired AS lease_expired, c.reltuples::float8 AS reltuples,
       s.null_frac::float8 AS null_frac, s.n_distinct::float8 AS n_distinct,
       s.most_common_vals::text::text[] AS common_values,
       s.most_common_freqs::float8[] AS common_shares
FROM pending p, in_flight f, pg_class c
LEFT JOIN pg_stats s
       ON s.schemaname = 'outbox' AND s.tablename = 'messages' AND s.attname = 'status'
      AND NOT s.inherited
WHERE c.oid = 'outbox.messages'::regclass;

-- Migration runner (outbox/db.py) ------------------------------------------------------

-- name: migration_lock
-- Every process that migrates takes it first, for its transaction: two `outbox migrate`
-- at once apply each file exactly once.
SELECT pg_advisory_xact_lock(%(key)s::bigint);

-- name: create_schema
CREATE SCHEMA IF NOT EXISTS outbox;

-- name: create_schema_migrations
CREATE TABLE IF NOT EXISTS outbox.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now());

-- name: applied_migrations
SELECT version FROM outbox.schema_migrations;

-- name: record_migration
INSERT INTO outbox.schema_migrations (version, name) VALUES (%(version)s, %(name)s);

-- name: pg_cron_available
-- Whether the server has the pg_cron extension to create (`outbox migrate --pg-cron`).
SELECT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'pg_cron');

-- name: create_pg_cron
CREATE EXTENSION IF NOT EXISTS pg_cron;

-- name: pg_cron_schedule
-- Registers the job, or replaces the one of that name; its jobid.
SELECT cron.schedule(%(name)s, %(schedule)s, %(command)s);

-- Senders (sql/migrations/012_senders.sql): the columns of SenderRow
-- (outbox/store/senders.py), in order. Every change NOTIFYs outbox_senders (a trigger).

-- name: list_senders
-- The stored senders, by id; one of them when %(id)s is given; each with its pause (its
-- state: sql/migrations/016_sender_limits.sql).
SELECT s.id, s.provider, s.settings, s.secrets, s.secret_fields, s.rate_limit, s.users,
       st.paused, s.created_at, s.updated_at
FROM outbox.senders s
LEFT JOIN outbox.sender_state st ON st.id = s.id
WHERE %(id)s::text IS NULL OR s.id = %(id)s::text
ORDER BY s.id;

-- name: sender_states
-- Each sender's state now (the columns of SenderState): its pause, and the rate it keeps
-- to (NULL: unlimited), as the claim computes it; one sender's when %(id)s is given.
SELECT id, paused,
       outbox.sender_rate(rate_limit, learned_limit, decreased_rate, decreased_at, now())
           AS effective_rate
FROM outbox.sender_state
WHERE %(id)s::text IS NULL OR id = %(id)s::text
ORDER BY id;

-- name: sender_counts
-- Pending and in-flight messages of each sender named (the two partial indexes of the
-- live statuses find them: finished history is never read). Senders without any are
-- left out.
SELECT sender,
       count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status = 'in_flight') AS in_flight
FROM outbox.messages
WHERE status IN ('pending', 'in_flight') AND sender = ANY (%(ids)s::text[])
GROUP BY sender;

-- name: put_sender
-- Creates or replaces a sender's configuration (its pause, a state, is kept); true when
-- it was created.
INSERT INTO outbox.senders AS s
    (id, provider, settings, secrets, secret_fields, rate_limit, users)
VALUES (%(id)s, %(provider)s, %(settings)s::jsonb, %(secrets)s::bytea,
        %(secret_fields)s::text[], %(rate_limit)s::double precision, %(users)s::text[])
ON CONFLICT (id) DO UPDATE
SET provider = EXCLUDED.provider,
    settings = EXCLUDED.settings,
    secrets = EXCLUDED.secrets,
    secret_fields = EXCLUDED.secret_fields,
    rate_limit = EXCLUDED.rate_limit,
    users = EXCLUDED.users,
    updated_at = now()
RETURNING xmax = 0 AS created;

-- name: delete_sender
-- Deletes a sender that has no pending or in-flight message (its finished history keeps
-- its id as text); its id, or no row (unknown, or still in use: the caller tells which).
DELETE FROM outbox.senders
WHERE id = %(id)s::text
  AND NOT EXISTS (SELECT FROM outbox.messages
                  WHERE sender = %(id)s::text AND status IN ('pending', 'in_flight'))
RETURNING id;

-- name: pause_sender
-- A pause by hand, with its sender_paused event (014_sender_routing.sql). Its id, or no
-- row (unknown).
SELECT id FROM outbox.pause_sender(%(id)s::text, %(reason)s::text, NULL, NULL, true) AS id;

-- name: resume_sender
-- With its sender_resumed event when it was paused. Its id, or no row (unknown).
SELECT id FROM outbox.resume_sender(%(id)s::text) AS id;

-- name: sender_status
-- Every sender with its live messages, for `outbox status`: `default` first (the
-- environment's, never stored: its provider and rate_limit are NULL here, the caller
-- knows them), then the stored ones by id, their credentials left unread. The live
-- messages are read as sender_counts reads them, from the live statuses' partial indexes.
WITH live AS (
    SELECT sender,
           count(*) FILTER (WHERE status = 'pending') AS pending,
           count(*) FILTER (WHERE status = 'in_flight') AS in_flight
    FROM outbox.messages
    WHERE status IN ('pending', 'in_flight')
    GROUP BY sender
), senders AS (
    SELECT 'default'::text AS id, NULL::text AS provider,
           NULL::double precision AS rate_limit
    UNION ALL
    SELECT id, provider, rate_limit FROM outbox.senders
)
SELECT s.id, s.provider, s.rate_limit, st.paused,
       outbox.sender_rate(st.rate_limit, st.learned_limit, st.decreased_rate,
                          st.decreased_at, now()) AS effective_rate,
       coalesce(l.pending, 0) AS pending, coalesce(l.in_flight, 0) AS in_flight
FROM senders AS s
LEFT JOIN outbox.sender_state AS st ON st.id = s.id
LEFT JOIN live AS l ON l.sender = s.id
ORDER BY s.id <> 'default', s.id;

-- Delivery receipts -------------------------------------------------------------------

-- name: record_receipts
-- One webhook POST's receipts, their events and one NOTIFY, in one transaction
-- (sql/migrations/018_delivery_receipts.sql): one row per receipt, with the message it
-- matched (NULL: unknown here).
SELECT n, message_id FROM outbox.record_receipts(%(receipts)s::jsonb, %(senders)s::text[]);
