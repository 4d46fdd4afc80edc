-- An admin puts a failed or cancelled message back in the queue (the dashboard's
-- "retry"): one call, one round trip, with its status event and the dispatchers' wake-up.

-- Back to pending with a fresh attempt budget: `max_attempts` becomes the attempts
-- spent so far plus `p_budget`, so the attempts already recorded keep their numbers
-- and the next one continues the sequence. Only from `error` or `cancelled`, and not
-- once the message has expired (it would only expire again). The row lock of the UPDATE
-- decides between two concurrent retries: the second finds the row pending and returns
-- nothing. A pending row is out of reach of the purge of errored (and of finished) rows.
-- Returns the row as this call left it, or nothing when it did not requeue it.
CREATE FUNCTION outbox.retry_message(p_id uuid, p_budget integer)
RETURNS SETOF outbox.messages
LANGUAGE plpgsql AS $$
DECLARE
    requeued outbox.messages;
BEGIN
    IF p_budget IS NULL OR p_budget < 1 THEN
        RAISE EXCEPTION 'p_budget must be positive, got %', p_budget;
    END IF;
    UPDATE outbox.messages
    SET status = 'pending',
        max_attempts = attempts + p_budget,
        next_attempt_at = GREATEST(now(), COALESCE(send_at, now())),  -- never before send_at
        last_error = NULL,
        provider_message_id = NULL,
        finished_at = NULL,
        locked_by = NULL,
        locked_until = NULL,
        updated_at = now()
    WHERE id = p_id
      AND status IN ('error', 'cancelled')
      AND (expires_at IS NULL OR expires_at > now())
    RETURNING * INTO requeued;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- A `message_retrying` event (status `retrying`, no error, its next_attempt_at),
    -- then the wake-up that the INSERT trigger gives new rows: an UPDATE has none.
    PERFORM outbox.write_events(ARRAY[requeued.id]);
    PERFORM pg_notify('outbox_new', '');
    RETURN NEXT requeued;
END;
$$;
