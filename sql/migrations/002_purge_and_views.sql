-- Retention (purge in short committed batches), the job_runs ledger of the scheduler,
-- and the inspection views for people who look at the queue with psql.

-- Sent and cancelled rows by the time they finished: the sent-retention purge walks it
-- oldest first (without it each batch would scan the whole table), and `throughput`
-- and `queue_summary` read it. A row enters it once, when it finishes; pending and
-- in-flight rows (the insert and claim hot path) never do.
CREATE INDEX messages_done_finished ON outbox.messages (finished_at)
    WHERE status IN ('sent', 'cancelled');

-- One row per schedule tick of a job: inserted (ON CONFLICT DO NOTHING) before the
-- work starts, so a tick runs at most once across every dispatcher; `rows` and
-- `finished_at` are filled in when it ends. A `baseline` row marks the tick that was
-- current when the scheduler first ran on this database: it is not run.
CREATE TABLE outbox.job_runs (
    job         text NOT NULL,
    tick        timestamptz NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    rows        bigint,
    runner      text,
    detail      jsonb,
    PRIMARY KEY (job, tick)
);

-- One batch ------------------------------------------------------------------------
-- Each deletes at most `batch_size` rows and returns how many; the callers (the
-- procedures below, `outbox purge`, the dispatchers' scheduler) call them until they
-- return less than a full batch, committing in between. Rows someone else has locked
-- are skipped, never waited for. Attempts and events go with their message (ON DELETE
-- CASCADE, through attempts_message_id and events_message_id).

CREATE FUNCTION outbox.purge_errored_batch(cutoff timestamptz, batch_size integer)
RETURNS integer LANGUAGE sql AS $$
    WITH doomed AS (
        SELECT id FROM outbox.messages
        WHERE status = 'error' AND finished_at < cutoff
        ORDER BY finished_at
        LIMIT batch_size
        FOR UPDATE SKIP LOCKED
    ), deleted AS (
        DELETE FROM outbox.messages m USING doomed d WHERE m.id = d.id RETURNING 1
    )
    SELECT count(*)::integer FROM deleted
$$;

CREATE FUNCTION outbox.purge_done_batch(cutoff timestamptz, batch_size integer)
RETURNS integer LANGUAGE sql AS $$
    WITH doomed AS (
        SELECT id FROM outbox.messages
        WHERE status IN ('sent', 'cancelled') AND finished_at < cutoff
        ORDER BY finished_at
        LIMIT batch_size
        FOR UPDATE SKIP LOCKED
    ), deleted AS (
        DELETE FROM outbox.messages m USING doomed d WHERE m.id = d.id RETURNING 1
    )
    SELECT count(*)::integer FROM deleted
$$;

CREATE FUNCTION outbox.purge_events_batch(cutoff timestamptz, batch_size integer)
RETURNS integer LANGUAGE sql AS $$
    WITH doomed AS (
        SELECT id FROM outbox.events
        WHERE created_at < cutoff
        ORDER BY created_at
        LIMIT batch_size
        FOR UPDATE SKIP LOCKED
    ), deleted AS (
        DELETE FROM outbox.events e USING doomed d WHERE e.id = d.id RETURNING 1
    )
    SELECT count(*)::integer FROM deleted
$$;

-- Dry runs: what a purge with these cutoffs would delete now.
CREATE FUNCTION outbox.purge_counts(
    error_cutoff timestamptz, done_cutoff timestamptz, event_cutoff timestamptz)
RETURNS TABLE (errored bigint, done bigint, events bigint) LANGUAGE sql STABLE AS $$
    SELECT
        (SELECT count(*) FROM outbox.messages
          WHERE status = 'error' AND finished_at < error_cutoff),
        CASE WHEN done_cutoff IS NULL THEN 0 ELSE
        (SELECT count(*) FROM outbox.messages
          WHERE status IN ('sent', 'cancelled') AND finished_at < done_cutoff) END,
        CASE WHEN event_cutoff IS NULL THEN 0 ELSE
        (SELECT count(*) FROM outbox.events WHERE created_at < event_cutoff) END
$$;

-- From psql: CALL outbox.purge_errored();  CALL outbox.purge_errored('30 days', 1000);
-- Procedures, so that each batch commits (run them outside an explicit transaction).
-- The count is RAISEd as a NOTICE and returned in `deleted`.

CREATE PROCEDURE outbox.purge_errored(
    older_than interval DEFAULT '7 days',
    batch_size integer DEFAULT 5000,
    INOUT deleted bigint DEFAULT 0)
LANGUAGE plpgsql AS $$
DECLARE
    cutoff constant timestamptz := now() - older_than;
    n integer;
BEGIN
    IF batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be positive, got %', batch_size;
    END IF;
    deleted := 0;
    LOOP
        n := outbox.purge_errored_batch(cutoff, batch_size);
        deleted := deleted + n;
        COMMIT;
        EXIT WHEN n < batch_size;
    END LOOP;
    RAISE NOTICE 'outbox.purge_errored: % errored messages finished before % deleted',
        deleted, cutoff;
END;
$$;

-- Sent and cancelled messages; NULL or a zero interval keeps them.
CREATE PROCEDURE outbox.purge_sent(
    older_than interval DEFAULT '30 days',
    batch_size integer DEFAULT 5000,
    INOUT deleted bigint DEFAULT 0)
LANGUAGE plpgsql AS $$
DECLARE
    cutoff constant timestamptz := now() - older_than;
    n integer;
BEGIN
    deleted := 0;
    IF older_than IS NULL OR older_than <= interval '0' THEN
        RAISE NOTICE 'outbox.purge_sent: retention 0, sent messages kept';
        RETURN;
    END IF;
    IF batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be positive, got %', batch_size;
    END IF;
    LOOP
        n := outbox.purge_done_batch(cutoff, batch_size);
        deleted := deleted + n;
        COMMIT;
        EXIT WHEN n < batch_size;
    END LOOP;
    RAISE NOTICE 'outbox.purge_sent: % sent/cancelled messages finished before % deleted',
        deleted, cutoff;
END;
$$;

-- Events of messages that are still kept; NULL or a zero interval keeps them.
CREATE PROCEDURE outbox.purge_events(
    older_than interval DEFAULT '7 days',
    batch_size integer DEFAULT 5000,
    INOUT deleted bigint DEFAULT 0)
LANGUAGE plpgsql AS $$
DECLARE
    cutoff constant timestamptz := now() - older_than;
    n integer;
BEGIN
    deleted := 0;
    IF older_than IS NULL OR older_than <= interval '0' THEN
        RAISE NOTICE 'outbox.purge_events: retention 0, events kept';
        RETURN;
    END IF;
    IF batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be positive, got %', batch_size;
    END IF;
    LOOP
        n := outbox.purge_events_batch(cutoff, batch_size);
        deleted := deleted + n;
        COMMIT;
        EXIT WHEN n < batch_size;
    END LOOP;
    RAISE NOTICE 'outbox.purge_events: % events created before % deleted', deleted, cutoff;
END;
$$;

-- All three: what the scheduled job (or pg_cron, see `outbox migrate --pg-cron`) runs.
CREATE PROCEDURE outbox.purge(
    error_retention interval DEFAULT '7 days',
    sent_retention interval DEFAULT '30 days',
    event_retention interval DEFAULT '7 days',
    batch_size integer DEFAULT 5000,
    INOUT errored bigint DEFAULT 0,
    INOUT sent bigint DEFAULT 0,
    INOUT events bigint DEFAULT 0)
LANGUAGE plpgsql AS $$
BEGIN
    CALL outbox.purge_errored(error_retention, batch_size, errored);
    CALL outbox.purge_sent(sent_retention, batch_size, sent);
    CALL outbox.purge_events(event_retention, batch_size, events);
END;
$$;

-- Inspection views ---------------------------------------------------------------
-- Each reads through an index whose size is bounded by what it shows (the partial
-- indexes of pending, in-flight, errored and finished rows; attempts by finish time),
-- so they stay cheap on a queue of millions of rows. See the README.

-- Per status: how many, the oldest (pending: the longest-waiting due time; in flight:
-- the earliest lease expiry; finished: the earliest finish), and how many are due now.
CREATE VIEW outbox.queue_summary AS
SELECT 'pending'::text AS status, count(*) AS count, min(next_attempt_at) AS oldest,
       count(*) FILTER (WHERE next_attempt_at <= now()) AS due_now
FROM outbox.messages WHERE status = 'pending'
UNION ALL
SELECT 'in_flight', count(*), min(locked_until),
       count(*) FILTER (WHERE locked_until < now())
FROM outbox.messages WHERE status = 'in_flight'
UNION ALL
SELECT 'sent', count(*), min(finished_at), 0
FROM outbox.messages WHERE status = 'sent'
UNION ALL
SELECT 'error', count(*), min(finished_at), 0
FROM outbox.messages WHERE status = 'error'
UNION ALL
SELECT 'cancelled', count(*), min(finished_at), 0
FROM outbox.messages WHERE status = 'cancelled';

COMMENT ON VIEW outbox.queue_summary IS
    'Per status: count, oldest (pending: earliest next_attempt_at; in_flight: earliest '
    'lease expiry; sent/error/cancelled: earliest finished_at) and due_now (pending: due; '
    'in_flight: lease expired)';

-- In flight with an expired lease: their dispatcher died or hangs; the lease reaper
-- of any dispatcher puts them back (or to error) within a poll interval.
CREATE VIEW outbox.stuck_messages AS
SELECT id, user_id, "to", type, attempts, max_attempts, locked_by, locked_until,
       now() - locked_until AS overdue, updated_at AS claimed_at
FROM outbox.messages
WHERE status = 'in_flight' AND locked_until < now()
ORDER BY locked_until;

-- The 100 latest final failures, newest first, with their attempts and last error.
CREATE VIEW outbox.recent_failures AS
SELECT m.id, m.user_id, m."to", m.type, m.attempts, m.max_attempts, m.finished_at,
       m.last_error,
       (SELECT a.outcome FROM outbox.attempts a
         WHERE a.message_id = m.id ORDER BY a.attempt DESC LIMIT 1) AS last_outcome
FROM outbox.messages m
WHERE m.status = 'error'
ORDER BY m.finished_at DESC
LIMIT 100;

-- Sent and failed (final error) per minute over the last hour, every minute listed.
CREATE VIEW outbox.throughput AS
WITH minutes AS (
    SELECT generate_series(date_trunc('minute', now()) - interval '59 minutes',
                           date_trunc('minute', now()), interval '1 minute') AS minute
), sent AS (
    SELECT date_trunc('minute', finished_at) AS minute, count(*) AS n
    FROM outbox.messages
    WHERE status = 'sent'
      AND finished_at >= date_trunc('minute', now()) - interval '59 minutes'
    GROUP BY 1
), failed AS (
    SELECT date_trunc('minute', finished_at) AS minute, count(*) AS n
    FROM outbox.messages
    WHERE status = 'error'
      AND finished_at >= date_trunc('minute', now()) - interval '59 minutes'
    GROUP BY 1
)
SELECT m.minute, COALESCE(s.n, 0) AS sent, COALESCE(f.n, 0) AS failed
FROM minutes m
LEFT JOIN sent s USING (minute)
LEFT JOIN failed f USING (minute)
ORDER BY m.minute DESC;

-- Provider call latency per minute over the last hour (attempts that reached the
-- provider, i.e. that have a latency), in milliseconds.
CREATE VIEW outbox.provider_latency AS
SELECT date_trunc('minute', finished_at) AS minute,
       count(*) AS calls,
       round(percentile_cont(0.50) WITHIN GROUP (ORDER BY latency_ms)::numeric, 1) AS p50_ms,
       round(percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms)::numeric, 1) AS p95_ms,
       round(percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms)::numeric, 1) AS p99_ms,
       round(max(latency_ms)::numeric, 1) AS max_ms
FROM outbox.attempts
WHERE finished_at >= date_trunc('minute', now()) - interval '59 minutes'
  AND latency_ms IS NOT NULL
GROUP BY 1
ORDER BY 1 DESC;

-- Queue tables churn (every message is updated a few times, then deleted by the purge):
-- vacuum and analyze them after 5 % / 2 % of their rows changed rather than the
-- default 20 % / 10 %, so dead rows from a nightly purge are reclaimed promptly and
-- the visibility map stays fresh for the index-only scans of the views.
ALTER TABLE outbox.messages SET (autovacuum_vacuum_scale_factor = 0.05,
                                 autovacuum_analyze_scale_factor = 0.02);
ALTER TABLE outbox.attempts SET (autovacuum_vacuum_scale_factor = 0.05,
                                 autovacuum_analyze_scale_factor = 0.02);
ALTER TABLE outbox.events SET (autovacuum_vacuum_scale_factor = 0.05,
                               autovacuum_analyze_scale_factor = 0.02);
