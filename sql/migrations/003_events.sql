-- Status events written in the same transaction as the state change, and the
-- batched completion and the lease reaper as functions: one round trip each, with
-- the event lock taken only around the event insert.

-- Every transaction that writes events takes this lock just before inserting
-- them and holds it to commit, so event ids become visible in id order: a reader
-- that has seen id N never later finds an id below N. With batched completion the
-- lock is taken once per batch, for the time of one multi-row INSERT and a commit.
CREATE FUNCTION outbox.event_lock_key() RETURNS bigint LANGUAGE sql IMMUTABLE
    AS 'SELECT 8031924123718415461';  -- 0x6f7574626f786565, "outboxee"

-- One event per message id, from the state the message is in now (in this
-- transaction), in the order given; one NOTIFY with the highest new id.
CREATE FUNCTION outbox.write_events(p_ids uuid[]) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    last_id bigint;
BEGIN
    IF p_ids IS NULL OR cardinality(p_ids) = 0 THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(outbox.event_lock_key());
    WITH inserted AS (
        INSERT INTO outbox.events (message_id, user_id, event, data, created_at)
        SELECT m.id,
               m.user_id,
               CASE m.status WHEN 'pending' THEN 'message_retrying' ELSE 'message_sent' END,
               jsonb_build_object(
                   'message_id', m.id,
                   'status', CASE m.status WHEN 'sent' THEN 'queued'
                                           WHEN 'pending' THEN 'retrying'
                                           ELSE 'failed' END,
                   'to', m."to",
                   'timestamp', outbox.wire_time(m.updated_at),
                   'error', CASE WHEN m.status = 'sent' THEN NULL ELSE m.last_error END,
                   'client_message_id', m.client_message_id,
                   'provider_message_id', m.provider_message_id,
                   'attempt', m.attempts)
               || CASE WHEN m.status = 'pending'
                       THEN jsonb_build_object('next_attempt_at', outbox.wire_time(m.next_attempt_at))
                       ELSE '{}'::jsonb END,
               m.updated_at
        FROM unnest(p_ids) WITH ORDINALITY AS t(id, n)
        JOIN outbox.messages m ON m.id = t.id
        ORDER BY t.n
        RETURNING id
    )
    SELECT max(id) INTO last_id FROM inserted;
    IF last_id IS NOT NULL THEN
        PERFORM pg_notify('outbox_events', last_id::text);
    END IF;
    RETURN last_id;
END;
$$;

-- UTC, ISO 8601 with milliseconds and Z: the one timestamp format on the wire.
CREATE FUNCTION outbox.wire_time(ts timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') $$;

-- Batched completion: many outcomes in one call. A row is written only while this
-- dispatcher still holds it for this attempt, so a dispatcher whose lease expired
-- and whose row was reclaimed cannot undo a newer state. Returns the ids applied.
CREATE FUNCTION outbox.complete_attempts(p_outcomes json, p_dispatcher text)
RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
DECLARE
    applied uuid[];
    eventful uuid[];
BEGIN
    WITH outcome AS (
        SELECT *
        FROM json_to_recordset(p_outcomes)
            AS o(id uuid, attempt int, status text, next_attempt_at timestamptz, error text,
                 provider_message_id text, refund int, outcome text, started_at timestamptz,
                 finished_at timestamptz, latency_ms float8)
    ),
    updated AS (
        UPDATE outbox.messages m
        SET status = o.status,
            attempts = m.attempts - o.refund,
            next_attempt_at = COALESCE(o.next_attempt_at, m.next_attempt_at),
            last_error = COALESCE(o.error, m.last_error),
            provider_message_id = COALESCE(o.provider_message_id, m.provider_message_id),
            locked_by = NULL,
            locked_until = NULL,
            updated_at = now(),
            finished_at = CASE WHEN o.status IN ('sent', 'error') THEN now() END
        FROM outcome o
        WHERE m.id = o.id
          AND m.status = 'in_flight'
          AND m.locked_by = p_dispatcher
          AND m.attempts = o.attempt
        RETURNING m.id
    ),
    recorded AS (
        INSERT INTO outbox.attempts
            (message_id, attempt, dispatcher, started_at, finished_at, outcome, error, latency_ms)
        SELECT o.id, o.attempt, p_dispatcher, o.started_at, o.finished_at, o.outcome, o.error,
               o.latency_ms
        FROM outcome o JOIN updated u ON u.id = o.id
        RETURNING message_id, outcome
    )
    -- A sender-level pause or a shutdown hand-back is not news for the client.
    SELECT array_agg(message_id),
           array_agg(message_id) FILTER (WHERE outcome NOT IN ('sender', 'interrupted'))
    INTO applied, eventful
    FROM recorded;
    PERFORM outbox.write_events(eventful);
    RETURN QUERY SELECT unnest(applied);
END;
$$;

-- Rows whose dispatcher stopped answering: back to pending, or to error when
-- their attempts are spent. Each is recorded as a `lease_expired` attempt and
-- told to the client like any other retry or final failure.
CREATE FUNCTION outbox.reap_expired_leases(p_limit int) RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
DECLARE
    reaped_ids uuid[];
BEGIN
    WITH expired AS (
        SELECT id, locked_by, updated_at AS claimed_at
        FROM outbox.messages
        WHERE status = 'in_flight' AND locked_until < now()
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
