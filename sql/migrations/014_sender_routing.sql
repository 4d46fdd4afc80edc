-- Messages name their sender everywhere they are shown, and senders have events of their
-- own: `sender_paused` and `sender_resumed` are stored with the message events (same ids,
-- same order, resumable with `since`), but belong to no message and to no single user.
-- They go to admins and to the users allowed to send from that sender (outbox/feed).

ALTER TABLE outbox.events
    ALTER COLUMN message_id DROP NOT NULL,
    ALTER COLUMN user_id DROP NOT NULL,
    ADD COLUMN sender text;  -- the message's sender, or the sender of a sender event

-- A resuming client reads its own events (events_user_id) and the sender events, few,
-- found here (its allowed senders are filtered from them).
CREATE INDEX events_sender_events ON outbox.events (id) WHERE message_id IS NULL;

-- write_events (007_cancel_event.sql) with the sender: in the column and in `data`.
CREATE OR REPLACE FUNCTION outbox.write_events(p_ids uuid[]) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    last_id bigint;
BEGIN
    IF p_ids IS NULL OR cardinality(p_ids) = 0 THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(outbox.event_lock_key());
    WITH inserted AS (
        INSERT INTO outbox.events (message_id, user_id, sender, event, data, created_at)
        SELECT m.id,
               m.user_id,
               m.sender,
               CASE m.status WHEN 'pending' THEN 'message_retrying'
                             WHEN 'cancelled' THEN 'message_cancelled'
                             ELSE 'message_sent' END,
               jsonb_build_object(
                   'message_id', m.id,
                   'status', CASE m.status WHEN 'sent' THEN 'queued'
                                           WHEN 'pending' THEN 'retrying'
                                           WHEN 'cancelled' THEN 'cancelled'
                                           ELSE 'failed' END,
                   'to', m."to",
                   'timestamp', outbox.wire_time(m.updated_at),
                   'error', CASE WHEN m.status IN ('sent', 'cancelled') THEN NULL
                                 ELSE m.last_error END,
                   'client_message_id', m.client_message_id,
                   'provider_message_id', m.provider_message_id,
                   'attempt', m.attempts,
                   'sender', m.sender)
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

-- One sender event (no message, no user), under the event lock, with its NOTIFY.
CREATE FUNCTION outbox.write_sender_event(p_sender text, p_event text, p_data jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(outbox.event_lock_key());
    INSERT INTO outbox.events (message_id, user_id, sender, event, data)
    VALUES (NULL, NULL, p_sender, p_event,
            jsonb_build_object('sender', p_sender, 'timestamp', outbox.wire_time(now()))
            || p_data)
    RETURNING id INTO new_id;
    PERFORM pg_notify('outbox_events', new_id::text);
    RETURN new_id;
END;
$$;

-- Pause a sender (by hand, or, later, by its breaker) with its `sender_paused` event:
-- `since` kept when it was already paused; the event only when the pause is new or
-- changed. Returns its id, or nothing when there is no such sender.
CREATE FUNCTION outbox.pause_sender(
    p_id text, p_reason text, p_code text, p_until timestamptz, p_manual boolean)
RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
    before jsonb;
    after jsonb;
BEGIN
    SELECT paused INTO before FROM outbox.senders WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    after := jsonb_build_object(
        'reason', p_reason,
        'code', p_code,
        'since', COALESCE(before -> 'since', to_jsonb(outbox.wire_time(now()))),
        'until', outbox.wire_time(p_until),
        'manual', p_manual);
    UPDATE outbox.senders SET paused = after, updated_at = now() WHERE id = p_id;
    IF before IS DISTINCT FROM after THEN
        PERFORM outbox.write_sender_event(p_id, 'sender_paused', jsonb_build_object(
            'reason', p_reason, 'code', p_code, 'since', after -> 'since',
            'until', after -> 'until', 'manual', p_manual));
    END IF;
    RETURN NEXT p_id;
END;
$$;

-- Resume a sender with its `sender_resumed` event (only when it was paused). Returns its
-- id, or nothing when there is no such sender.
CREATE FUNCTION outbox.resume_sender(p_id text) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    before jsonb;
BEGIN
    SELECT paused INTO before FROM outbox.senders WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF before IS NOT NULL THEN
        UPDATE outbox.senders SET paused = NULL, updated_at = now() WHERE id = p_id;
        PERFORM outbox.write_sender_event(p_id, 'sender_resumed', jsonb_build_object(
            'reason', NULL, 'code', NULL, 'paused_since', before -> 'since'));
        -- Its messages are due again: wake the dispatchers as an insert would.
        PERFORM pg_notify('outbox_new', '');
    END IF;
    RETURN NEXT p_id;
END;
$$;

-- The message views (011_message_views.sql) with the sender. message_view's columns
-- are listed_message's, fixed when it was created: both are made again.
DROP FUNCTION outbox.retry_message_view(uuid, integer);
DROP VIEW outbox.message_view;

CREATE OR REPLACE VIEW outbox.listed_message AS
SELECT m.id, m.user_id, m.status, m."to", m.type, m.client_message_id, m.attempts,
       m.max_attempts, m.next_attempt_at, m.send_at, m.expires_at, m.last_error,
       m.provider_message_id, m.created_at, m.updated_at, m.finished_at, m.sender
FROM outbox.messages m;

CREATE VIEW outbox.message_view AS
SELECT l.*,
       COALESCE(
           (SELECT jsonb_agg(jsonb_build_object(
                       'attempt', a.attempt,
                       'started_at', a.started_at,
                       'finished_at', a.finished_at,
                       'outcome', a.outcome,
                       'error', a.error) ORDER BY a.id)
            FROM outbox.attempts a WHERE a.message_id = l.id),
           '[]'::jsonb) AS history
FROM outbox.listed_message l;

CREATE FUNCTION outbox.retry_message_view(p_id uuid, p_budget integer)
RETURNS SETOF outbox.message_view
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM outbox.retry_message(p_id, p_budget);
    IF FOUND THEN
        RETURN QUERY SELECT * FROM outbox.message_view WHERE id = p_id;
    END IF;
END;
$$;
