-- Delivery receipts: what the provider tells of a message after it accepted it (Meta's
-- status webhooks, or a self-hosted gateway's), and the `message_status` events.
--
-- A message's delivery is a state that only climbs: failed (1) < delivered (2) < read (3),
-- with no receipt yet NULL ("accepted" once the message is sent). A receipt moves it up,
-- never down: read then a late delivered stays read; failed then a later delivered is
-- delivered (multi-device: Meta may report both, in either order); a duplicate changes
-- nothing. Each timestamp (the provider's time) is the first one reported for its
-- status; `read` also fills delivered_at when empty. failed_at and delivery_error stay
-- when a later delivered wins: they tell what was reported.
ALTER TABLE outbox.messages
    ADD COLUMN delivery_state smallint CHECK (delivery_state BETWEEN 1 AND 3),
    ADD COLUMN provider_sent_at timestamptz,
    ADD COLUMN delivered_at timestamptz,
    ADD COLUMN read_at timestamptz,
    ADD COLUMN failed_at timestamptz,
    ADD COLUMN delivery_error jsonb;

-- Receipts that do not carry the task id (biz_opaque_callback_data) are matched by the
-- provider's message id. Only sent messages have one: the completion of a sent message
-- writes one more index entry (the cost measured in the README's Performance section).
CREATE INDEX messages_provider_message_id ON outbox.messages (provider_message_id)
    WHERE provider_message_id IS NOT NULL;
-- GET …/messages?delivery=: a user's (and an admin's) messages in one delivery state, newest
-- first, without walking the states that are not asked for (only messages with a receipt
-- have an entry; `accepted`, the state of sent messages without one, reads the sent range).
CREATE INDEX messages_user_delivery ON outbox.messages (user_id, delivery_state, id)
    WHERE delivery_state IS NOT NULL;
CREATE INDEX messages_delivery ON outbox.messages (delivery_state, id)
    WHERE delivery_state IS NOT NULL;

CREATE FUNCTION outbox.delivery_name(p smallint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE p WHEN 1 THEN 'failed' WHEN 2 THEN 'delivered' WHEN 3 THEN 'read' END;

-- The time of a message's current delivery state.
CREATE FUNCTION outbox.delivery_time(m outbox.messages) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE m.delivery_state WHEN 1 THEN m.failed_at WHEN 2 THEN m.delivered_at
                             WHEN 3 THEN m.read_at END;

-- One `message_status` event's data.
CREATE FUNCTION outbox.status_event_data(m outbox.messages) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
RETURN jsonb_build_object(
    'message_id', m.id,
    'status', outbox.delivery_name(m.delivery_state),
    'to', m."to",
    'timestamp', outbox.wire_time(outbox.delivery_time(m)),
    'error', CASE WHEN m.delivery_state = 1 THEN m.delivery_error END,
    'client_message_id', m.client_message_id,
    'provider_message_id', m.provider_message_id,
    'sender', m.sender,
    'priority', outbox.priority_name(m.priority));

-- write_events as before, and for a message that becomes final with a receipt already
-- recorded (one came while its call was still in flight), its `message_status` right
-- after its `message_sent`: a client never hears "delivered" before "queued".
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
               CASE WHEN k.receipt THEN 'message_status'
                    ELSE CASE m.status WHEN 'pending' THEN 'message_retrying'
                                       WHEN 'cancelled' THEN 'message_cancelled'
                                       ELSE 'message_sent' END END,
               CASE WHEN k.receipt THEN outbox.status_event_data(m)
               ELSE jsonb_build_object(
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
                   'sender', m.sender,
                   'priority', outbox.priority_name(m.priority))
               || CASE WHEN m.status = 'pending'
                       THEN jsonb_build_object('next_attempt_at', outbox.wire_time(m.next_attempt_at))
                       ELSE '{}'::jsonb END
               END,
               m.updated_at
        FROM unnest(p_ids) WITH ORDINALITY AS t(id, n)
        JOIN outbox.messages m ON m.id = t.id
        CROSS JOIN LATERAL (
            SELECT false AS receipt
            UNION ALL
            SELECT true WHERE m.delivery_state IS NOT NULL AND m.status = 'sent'
        ) k
        ORDER BY t.n, k.receipt
        RETURNING id
    )
    SELECT max(id) INTO last_id FROM inserted;
    IF last_id IS NOT NULL THEN
        PERFORM pg_notify('outbox_events', last_id::text);
    END IF;
    RETURN last_id;
END;
$$;

-- complete_attempts as before, with two changes. A receipt recorded while the call was in
-- flight proves the provider accepted the message: an outcome that would leave it
-- pending (an unknown outcome, or a failure of a call that did arrive) or in error
-- makes it `sent` instead, so it is not sent twice nor reported failed. And the rows are
-- updated (locked) in id order, as record_receipts locks them, so that a webhook POST
-- and a completion of the same messages never wait for each other in a cycle.
CREATE OR REPLACE FUNCTION outbox.complete_attempts(p_outcomes json, p_dispatcher text)
RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
DECLARE
    applied uuid[];
    eventful uuid[];
    senders_news boolean;
BEGIN
    WITH outcome AS MATERIALIZED (
        SELECT *
        FROM json_to_recordset(p_outcomes)
            AS o(id uuid, attempt int, status text, next_attempt_at timestamptz, error text,
                 provider_message_id text, refund int, outcome text, started_at timestamptz,
                 finished_at timestamptz, latency_ms float8)
        ORDER BY id
    ),
    updated AS (
        UPDATE outbox.messages m
        SET status = CASE WHEN m.delivery_state IS NOT NULL OR m.provider_sent_at IS NOT NULL
                          THEN 'sent' ELSE o.status END,
            attempts = m.attempts - o.refund,
            throttles = m.throttles + CASE WHEN o.outcome = 'throttled' THEN 1 ELSE 0 END,
            next_attempt_at = COALESCE(o.next_attempt_at, m.next_attempt_at),
            last_error = CASE WHEN m.delivery_state IS NOT NULL OR m.provider_sent_at IS NOT NULL
                              THEN NULL ELSE COALESCE(o.error, m.last_error) END,
            provider_message_id = COALESCE(o.provider_message_id, m.provider_message_id),
            locked_by = NULL,
            locked_until = NULL,
            updated_at = now(),
            finished_at = CASE WHEN o.status IN ('sent', 'error')
                                 OR m.delivery_state IS NOT NULL
                                 OR m.provider_sent_at IS NOT NULL THEN now() END
        FROM outcome o
        WHERE m.id = o.id
          AND m.status = 'in_flight'
          AND m.locked_by = p_dispatcher
          AND m.attempts = o.attempt
        RETURNING m.id, m.status, o.outcome
    ),
    recorded AS (
        INSERT INTO outbox.attempts
            (message_id, attempt, dispatcher, started_at, finished_at, outcome, error, latency_ms)
        SELECT o.id, o.attempt, p_dispatcher, o.started_at, o.finished_at, o.outcome, o.error,
               o.latency_ms
        FROM outcome o JOIN updated u ON u.id = o.id
    )
    -- A sender-level pause, a throttle or a shutdown hand-back is not news for the client
    -- while the message waits. Read from `updated` alone: a join of the two CTEs' rows
    -- was planned as a nested loop (each CTE estimated at 100 rows), 9 ms per 512.
    SELECT array_agg(u.id),
           array_agg(u.id) FILTER (
               WHERE u.status <> 'pending'
                  OR u.outcome NOT IN ('sender', 'interrupted', 'throttled')),
           bool_or(u.outcome IN ('sender', 'throttled'))
    INTO applied, eventful, senders_news
    FROM updated u;
    IF senders_news
       OR EXISTS (SELECT FROM outbox.sender_state WHERE probe_id = ANY (applied)) THEN
        PERFORM outbox.apply_sender_outcomes(p_outcomes, applied);
    END IF;
    PERFORM outbox.write_events(eventful);
    RETURN QUERY SELECT unnest(applied);
END;
$$;

-- Records one webhook POST's receipts in one transaction, with their events and one
-- NOTIFY. p_receipts: a JSON array of {"n": its index in the POST, "task_id": the
-- biz_opaque_callback_data or the gateway's task_id (any text), "id": the provider's
-- message id, "status": sent|delivered|read|failed, "at": unix seconds, "error": a JSON
-- object or null}. Each is matched by its task id first, else by the provider's id, among
-- the messages of p_senders (NULL: any sender). Returns one row per receipt: its n and the
-- message it matched (NULL: unknown here).
--
-- A receipt proves that the provider accepted the message. A message that is still
-- pending, or in error, after a call whose outcome was unknown (or a failure the
-- provider did not really have), or cancelled meanwhile, becomes `sent`, with its
-- `message_sent` event: the truth beats a retry that would send it twice, or a wrong
-- final state (as a late success does). A message
-- still in flight keeps its status: its completion makes it `sent` whatever the call's
-- outcome (complete_attempts), and its `message_status` follows its `message_sent`
-- (write_events). Meta's `sent` status records provider_sent_at only: no event.
CREATE FUNCTION outbox.record_receipts(p_receipts jsonb, p_senders text[])
RETURNS TABLE (n integer, message_id uuid)
LANGUAGE plpgsql AS $$
DECLARE
    matches jsonb;
    became_sent uuid[];
    climbed uuid[];
    last_id bigint;
BEGIN
    WITH receipts AS (
        SELECT (r ->> 'n')::integer AS n,
               r ->> 'status' AS status,
               to_timestamp((r ->> 'at')::double precision) AS at,
               NULLIF(r ->> 'id', '') AS provider_id,
               CASE WHEN jsonb_typeof(r -> 'error') = 'object' THEN r -> 'error' END AS error,
               CASE WHEN r ->> 'task_id' ~* '^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$'
                    THEN (r ->> 'task_id')::uuid END AS task_id
        FROM jsonb_array_elements(p_receipts) AS r
    ), matched AS (
        SELECT r.*,
               (SELECT k.id
                FROM (SELECT m.id FROM outbox.messages m
                      WHERE m.id = r.task_id
                        AND (p_senders IS NULL OR m.sender = ANY (p_senders))
                      UNION ALL
                      SELECT m.id FROM outbox.messages m
                      WHERE m.provider_message_id = r.provider_id
                        AND (p_senders IS NULL OR m.sender = ANY (p_senders))
                      LIMIT 1) k) AS message_id
        FROM receipts r
    ), news AS (
        SELECT r.message_id,
               max(CASE r.status WHEN 'failed' THEN 1 WHEN 'delivered' THEN 2
                                 WHEN 'read' THEN 3 END)::smallint AS state,
               min(r.at) FILTER (WHERE r.status = 'sent') AS sent_at,
               min(r.at) FILTER (WHERE r.status = 'delivered') AS delivered_at,
               min(r.at) FILTER (WHERE r.status = 'read') AS read_at,
               min(r.at) FILTER (WHERE r.status = 'failed') AS failed_at,
               (array_agg(r.error ORDER BY r.at) FILTER (WHERE r.status = 'failed'))[1] AS error,
               (array_agg(r.provider_id) FILTER (WHERE r.provider_id IS NOT NULL))[1]
                   AS provider_id
        FROM matched r
        WHERE r.message_id IS NOT NULL
        GROUP BY r.message_id
    ), current AS (
        -- Locked in id order (two POSTs never wait for each other in a cycle) and read
        -- as committed after any wait: the change is decided from the latest row.
        SELECT m.id, m.status, m.delivery_state, m.provider_sent_at, m.delivered_at,
               m.read_at, m.failed_at
        FROM outbox.messages m
        WHERE m.id IN (SELECT w.message_id FROM news w)
        ORDER BY m.id
        FOR UPDATE
    ), changes AS (
        SELECT c.id, c.status AS old_status, COALESCE(c.delivery_state, 0) AS old_state,
               GREATEST(c.delivery_state, w.state) AS state,
               COALESCE(c.provider_sent_at, w.sent_at) AS provider_sent_at,
               COALESCE(c.delivered_at, w.delivered_at, w.read_at) AS delivered_at,
               COALESCE(c.read_at, w.read_at) AS read_at,
               COALESCE(c.failed_at, w.failed_at) AS failed_at,
               CASE WHEN c.failed_at IS NULL THEN w.error END AS error,
               w.provider_id,
               c.status IN ('pending', 'error', 'cancelled') AS proves_sent
        FROM current c JOIN news w ON w.message_id = c.id
    ), updated AS (
        UPDATE outbox.messages m
        SET delivery_state = ch.state,
            provider_sent_at = ch.provider_sent_at,
            delivered_at = ch.delivered_at,
            read_at = ch.read_at,
            failed_at = ch.failed_at,
            delivery_error = COALESCE(m.delivery_error, ch.error),
            provider_message_id = COALESCE(m.provider_message_id, ch.provider_id),
            status = CASE WHEN ch.proves_sent THEN 'sent' ELSE m.status END,
            finished_at = CASE WHEN ch.proves_sent THEN now() ELSE m.finished_at END,
            last_error = CASE WHEN ch.proves_sent THEN NULL ELSE m.last_error END,
            held = m.held AND NOT ch.proves_sent,
            updated_at = now()
        FROM changes ch
        WHERE m.id = ch.id
          AND (ch.proves_sent
               OR ch.state IS DISTINCT FROM m.delivery_state
               OR ch.provider_sent_at IS DISTINCT FROM m.provider_sent_at
               OR ch.delivered_at IS DISTINCT FROM m.delivered_at
               OR ch.read_at IS DISTINCT FROM m.read_at
               OR ch.failed_at IS DISTINCT FROM m.failed_at)
        RETURNING m.id, ch.proves_sent, ch.old_status, ch.old_state, m.delivery_state
    )
    SELECT (SELECT jsonb_agg(jsonb_build_object('n', r.n, 'message_id', r.message_id))
            FROM matched r),
           (SELECT array_agg(u.id ORDER BY u.id) FROM updated u WHERE u.proves_sent),
           (SELECT array_agg(u.id ORDER BY u.id) FROM updated u
            WHERE NOT u.proves_sent AND u.old_status IN ('sent', 'cancelled')
              AND u.delivery_state > u.old_state)
    INTO matches, became_sent, climbed;

    -- A message proven sent: its message_sent, then its message_status when it has one.
    PERFORM outbox.write_events(became_sent);
    IF climbed IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(outbox.event_lock_key());
        WITH inserted AS (
            INSERT INTO outbox.events (message_id, user_id, sender, event, data)
            SELECT m.id, m.user_id, m.sender, 'message_status', outbox.status_event_data(m)
            FROM unnest(climbed) AS c(id)
            JOIN outbox.messages m ON m.id = c.id
            ORDER BY m.id
            RETURNING id
        )
        SELECT max(id) INTO last_id FROM inserted;
        PERFORM pg_notify('outbox_events', last_id::text);
    END IF;

    RETURN QUERY
    SELECT (x ->> 'n')::integer, (x ->> 'message_id')::uuid
    FROM jsonb_array_elements(COALESCE(matches, '[]'::jsonb)) AS x;
END;
$$;

-- The message views with each message's delivery (history stays the last column).
DROP FUNCTION outbox.retry_message_view(uuid, integer);
DROP VIEW outbox.message_view;
DROP VIEW outbox.listed_message;

CREATE VIEW outbox.listed_message AS
SELECT m.id, m.user_id, m.status, m."to", m.type, m.client_message_id, m.attempts,
       m.max_attempts, m.next_attempt_at, m.send_at, m.expires_at, m.last_error,
       m.provider_message_id, m.created_at, m.updated_at, m.finished_at, m.sender,
       m.throttles, outbox.priority_name(m.priority) AS priority, m.ordered,
       outbox.waiting_for(m) AS waiting_for,
       m.delivery_state, m.provider_sent_at, m.delivered_at, m.read_at, m.failed_at,
       m.delivery_error
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

-- Deliveries per sender and hour of acceptance (the hour its `sent` was recorded):
-- accepted (every message the provider accepted), delivered (read ones included), read,
-- failed (the receipt's state: a later delivered wins), and the median times from
-- acceptance to delivered and to read, in seconds (the provider's clock against ours).
-- The function reads the messages accepted since p_since through the finished index
-- (a window of a big table); the view is every hour still kept.
CREATE FUNCTION outbox.delivery_funnel_since(p_since timestamptz)
RETURNS TABLE (sender text, hour timestamptz, accepted bigint, delivered bigint,
               read bigint, failed bigint, median_seconds_to_delivered double precision,
               median_seconds_to_read double precision)
LANGUAGE sql STABLE AS $$
    SELECT m.sender,
           date_trunc('hour', m.finished_at),
           count(*),
           count(m.delivered_at),
           count(m.read_at),
           count(*) FILTER (WHERE m.delivery_state = 1),
           percentile_cont(0.5) WITHIN GROUP (
               ORDER BY extract(epoch FROM m.delivered_at - m.finished_at)),
           percentile_cont(0.5) WITHIN GROUP (
               ORDER BY extract(epoch FROM m.read_at - m.finished_at))
    FROM outbox.messages m
    WHERE m.status = 'sent' AND m.finished_at >= p_since
    GROUP BY 1, 2
$$;

CREATE VIEW outbox.delivery_funnel AS
SELECT * FROM outbox.delivery_funnel_since('-infinity');
