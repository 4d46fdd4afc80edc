-- A success is never thrown away.
--
-- complete_attempts (003_events.sql) writes an outcome only while its dispatcher holds
-- the row for that attempt. When the lease runs out first (the database was away longer
-- than the lease while the provider answered 200), the reaper has put the row back, and
-- dropping the success meant sending the message again. The rule now: a success for
-- attempt N is recorded whenever no attempt after N has started. complete_attempts, the
-- hot path, is unchanged; its caller hands the successes it did not apply to
-- record_late_successes (below), in a transaction of their own.

-- Successes whose attempt was reaped (its `lease_expired` row written by this dispatcher)
-- while no later attempt has started: the message was put back `pending` (or, by an
-- admin's retry, pending again), made `error` because N was its last attempt, or
-- cancelled after the reap. Attempt N's row turns from `lease_expired` into the success,
-- the message becomes `sent`, and its `message_sent` (queued) event follows the earlier
-- `message_retrying`, `failed` or `message_cancelled`: the truth beats a wrong state.
-- A row in flight again (attempt N+1 claimed) or already sent is left alone. Returns the
-- ids recorded; any other outcome is the caller's to count as lost.
CREATE FUNCTION outbox.record_late_successes(p_outcomes json, p_dispatcher text)
RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
DECLARE
    recorded uuid[];
BEGIN
    -- Lock the rows first: a claim or a reap holding one now commits before it is read
    -- below (a statement's snapshot is taken before it waits for a row lock, and would
    -- miss the reap's attempt row). Reapers and claims skip locked rows: no deadlock.
    PERFORM 1
    FROM outbox.messages m
    WHERE m.id IN (SELECT o.id FROM json_to_recordset(p_outcomes) AS o(id uuid, status text)
                   WHERE o.status = 'sent')
    ORDER BY m.id
    FOR UPDATE;

    WITH outcome AS (
        SELECT *
        FROM json_to_recordset(p_outcomes)
            AS o(id uuid, attempt int, status text, provider_message_id text,
                 started_at timestamptz, finished_at timestamptz, latency_ms float8)
        WHERE o.status = 'sent'
    ),
    updated AS (
        UPDATE outbox.messages m
        SET status = 'sent',
            provider_message_id = COALESCE(o.provider_message_id, m.provider_message_id),
            locked_by = NULL,
            locked_until = NULL,
            updated_at = now(),
            finished_at = now()
        FROM outcome o
        WHERE m.id = o.id
          AND m.attempts = o.attempt  -- no attempt after N has started
          AND m.status IN ('pending', 'error', 'cancelled')
          AND EXISTS (SELECT 1 FROM outbox.attempts a
                      WHERE a.message_id = o.id AND a.attempt = o.attempt
                        AND a.dispatcher = p_dispatcher AND a.outcome = 'lease_expired')
        RETURNING m.id
    ),
    rewritten AS (
        UPDATE outbox.attempts a
        SET outcome = 'sent',
            error = NULL,
            started_at = o.started_at,
            finished_at = o.finished_at,
            latency_ms = o.latency_ms
        FROM outcome o
        JOIN updated u ON u.id = o.id
        WHERE a.message_id = o.id AND a.attempt = o.attempt
          AND a.dispatcher = p_dispatcher AND a.outcome = 'lease_expired'
        RETURNING a.message_id
    )
    SELECT array_agg(message_id ORDER BY message_id) INTO recorded FROM rewritten;
    PERFORM outbox.write_events(recorded);  -- one NOTIFY
    RETURN QUERY SELECT unnest(recorded);
END;
$$;

-- The reaper leaves alone the rows its dispatcher still holds in memory (`p_keep`: calls
-- running, outcomes waiting to be written): a lease that ran out while the database was
-- away says nothing about a dispatcher that is alive and about to report. Otherwise as
-- before: back to pending, or to error when the attempts are spent, recorded as a
-- `lease_expired` attempt and told to the client.
CREATE FUNCTION outbox.reap_expired_leases(p_limit int, p_keep uuid[]) RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
DECLARE
    reaped_ids uuid[];
BEGIN
    WITH expired AS (
        SELECT id, locked_by, updated_at AS claimed_at
        FROM outbox.messages
        WHERE status = 'in_flight' AND locked_until < now()
          AND NOT (id = ANY (COALESCE(p_keep, '{}')))
        ORDER BY locked_until
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ),
    reaped AS (
        UPDATE outbox.messages m
        SET status = CASE WHEN m.attempts >= m.max_attempts THEN 'error' ELSE 'pending' END,
            last_error = 'lease expired: dispatcher ' || e.locked_by || ' did not report back',
            finished_at = CASE WHEN m.attempts >= m.max_attempts THEN now() END,
            next_attempt_at = now(),
            locked_by = NULL,
            locked_until = NULL,
            updated_at = now()
        FROM expired e
        WHERE m.id = e.id
        RETURNING m.id, m.attempts, e.locked_by, e.claimed_at
    ),
    recorded AS (
        INSERT INTO outbox.attempts
            (message_id, attempt, dispatcher, started_at, finished_at, outcome, error)
        SELECT id, attempts, locked_by, claimed_at, now(), 'lease_expired',
               'lease expired: dispatcher ' || locked_by || ' did not report back'
        FROM reaped
        RETURNING message_id
    )
    SELECT array_agg(message_id) INTO reaped_ids FROM recorded;
    PERFORM outbox.write_events(reaped_ids);
    RETURN QUERY SELECT unnest(reaped_ids);
END;
$$;

-- The one-argument form, which dispatchers of the previous release call, keeps nothing.
CREATE OR REPLACE FUNCTION outbox.reap_expired_leases(p_limit int) RETURNS SETOF uuid
LANGUAGE sql AS $$ SELECT outbox.reap_expired_leases(p_limit, '{}'::uuid[]) $$;
