-- A cancelled message is announced like the other final states: `message_cancelled`
-- (status `cancelled`, no error), written by the cancel in its own transaction, so that
-- every client of the feed (another session of the sender, the dashboard, an admin)
-- learns of it without polling.

-- write_events (003_events.sql) with the cancelled case; every other case unchanged.
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
        INSERT INTO outbox.events (message_id, user_id, event, data, created_at)
        SELECT m.id,
               m.user_id,
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

-- Cancel a pending message (of `p_user_id`, or anyone's when NULL) and write its event;
-- returns its id, or nothing when it was not pending (or not that user's).
CREATE FUNCTION outbox.cancel_message(p_id uuid, p_user_id text) RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
DECLARE
    cancelled_id uuid;
BEGIN
    UPDATE outbox.messages
    SET status = 'cancelled', finished_at = now(), updated_at = now()
    WHERE id = p_id AND status = 'pending'
      AND (p_user_id IS NULL OR user_id = p_user_id)
    RETURNING id INTO cancelled_id;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM outbox.write_events(ARRAY[cancelled_id]);
    RETURN NEXT cancelled_id;
END;
$$;
