-- Order per conversation, priority, and fairness between the users of one sender.
--
-- A conversation is one sender and one recipient (`to`, its digits as given). An ordered
-- message (the default) is called only once every earlier ordered message of its
-- conversation is final: its place is (order_at, seq), the time it takes its place (its
-- acceptance, or its send_at when later) and a sequence taken at insert, in array order
-- within a batch. Requests that overlap in time may take their places in either order.
--
-- Nothing is locked or looked up for order at insert but one index probe: a message that
-- may have a live earlier one in its conversation (one seen at insert, an earlier one of
-- its batch, or a send_at ahead: it takes its place later) gets `check_order`, and the
-- claim checks it: when an earlier live message exists, the claim locks that one FOR
-- SHARE (SKIP LOCKED: a message being finalised or claimed leaves the row for the next
-- claim) and parks the row, `held`, out of the claim's indexes. The lock makes the
-- earlier message's finalisation wait for the park to commit, so the trigger below, which
-- runs after every UPDATE of messages and releases the first live message of each
-- conversation that a statement finalised, sees it. A release keeps `check_order`: the
-- claim checks the row again. outbox.release_stranded, in the reaper's round, releases
-- what two finalisations of one conversation at the same moment could leave held.
--
-- Priority: 0 high, 1 normal, 2 low; the claim takes a sender's due rows by priority,
-- and within one, user by user, round-robin (claim_messages in sql/queries.sql).

CREATE SEQUENCE outbox.messages_seq AS bigint;

ALTER TABLE outbox.messages
    ADD COLUMN seq bigint NOT NULL DEFAULT nextval('outbox.messages_seq'),
    ADD COLUMN order_at timestamptz GENERATED ALWAYS AS (GREATEST(created_at, send_at)) STORED,
    ADD COLUMN priority smallint NOT NULL DEFAULT 1 CHECK (priority BETWEEN 0 AND 2),
    ADD COLUMN ordered boolean NOT NULL DEFAULT true,
    ADD COLUMN check_order boolean NOT NULL DEFAULT false,
    ADD COLUMN held boolean NOT NULL DEFAULT false;

ALTER SEQUENCE outbox.messages_seq OWNED BY outbox.messages.seq;

-- Messages live at the upgrade took their seq in the table's physical order, and nobody
-- looked for their earlier ones at insert: the claim checks them all.
UPDATE outbox.messages SET check_order = true WHERE status IN ('pending', 'in_flight');

-- The senders' heads (the claim's skip scan, its wake time): parked rows are not due.
DROP INDEX outbox.messages_sender_due;
CREATE INDEX messages_sender_due ON outbox.messages (sender, next_attempt_at)
    WHERE status = 'pending' AND NOT held;

-- The claim's walk: by sender, priority, then user (round-robin), each user's rows by due
-- time.
CREATE INDEX messages_claim ON outbox.messages (sender, priority, user_id, next_attempt_at)
    WHERE status = 'pending' AND NOT held;

-- The live messages of each conversation in order: the claim's check of an earlier one,
-- the release of the next; and a sender's live messages (its counts, its DELETE).
CREATE INDEX messages_live ON outbox.messages (sender, "to", order_at, seq)
    WHERE status IN ('pending', 'in_flight');

-- The parked rows, few: whether a finalisation has anything to release, and the sweep.
CREATE INDEX messages_held ON outbox.messages (sender, "to", order_at, seq)
    WHERE held AND status = 'pending';

-- The first live ordered message of each conversation given, released when parked; how
-- many were released (each one NOTIFYs outbox_new once per transaction).
CREATE FUNCTION outbox.release_conversations(p_senders text[], p_tos text[])
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    released integer;
BEGIN
    WITH conversation AS (
        SELECT DISTINCT c.sender, c."to"
        FROM unnest(p_senders, p_tos) AS c(sender, "to")
        WHERE EXISTS (SELECT FROM outbox.messages h
                      WHERE h.held AND h.status = 'pending'
                        AND h.sender = c.sender AND h."to" = c."to")
    ), first AS (
        SELECT f.id
        FROM conversation c
        CROSS JOIN LATERAL (
            SELECT e.id, e.held, e.status
            FROM outbox.messages e
            WHERE e.status IN ('pending', 'in_flight') AND e.sender = c.sender
              AND e."to" = c."to" AND e.ordered
            ORDER BY e.order_at, e.seq
            LIMIT 1) f
        WHERE f.held AND f.status = 'pending'
    ), released AS (
        UPDATE outbox.messages m
        SET held = false
        WHERE m.id = ANY (ARRAY(SELECT id FROM first)) AND m.held AND m.status = 'pending'
        RETURNING 1
    )
    SELECT count(*) INTO released FROM released;
    IF released > 0 THEN
        PERFORM pg_notify('outbox_new', '');
    END IF;
    RETURN released;
END;
$$;

-- After every UPDATE of messages: the conversations of the ordered rows it left final
-- (sent, error, cancelled) release their next message. Nothing is read when no row is
-- parked anywhere (one look at messages_held).
CREATE FUNCTION outbox.release_after_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    senders text[];
    tos text[];
BEGIN
    IF NOT EXISTS (SELECT FROM outbox.messages WHERE held AND status = 'pending') THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(n.sender), array_agg(n."to") INTO senders, tos
    FROM changed n
    WHERE n.ordered AND n.status IN ('sent', 'error', 'cancelled');
    IF senders IS NOT NULL THEN
        PERFORM outbox.release_conversations(senders, tos);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER messages_release_next
    AFTER UPDATE ON outbox.messages
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.release_after_update();

-- The safety net: parked rows that nothing will release (two messages of a conversation
-- finalised at the same moment, each seeing the other live). Visits the conversations with
-- parked rows after (p_sender, p_to), at most p_limit of them; releases each one's first
-- parked row when no live message before it is unparked or in flight. Returns the last
-- conversation visited, NULLs once the end is reached (start again from NULLs).
CREATE FUNCTION outbox.release_stranded(p_sender text, p_to text, p_limit integer,
                                        OUT last_sender text, OUT last_to text,
                                        OUT released integer)
LANGUAGE plpgsql AS $$
BEGIN
    WITH RECURSIVE conversation AS (
        (SELECT h.sender, h."to", 1 AS n
         FROM outbox.messages h
         WHERE h.held AND h.status = 'pending'
           AND (p_sender IS NULL OR (h.sender, h."to") > (p_sender, p_to))
         ORDER BY h.sender, h."to"
         LIMIT 1)
        UNION ALL
        SELECT x.sender, x."to", c.n + 1
        FROM conversation c
        CROSS JOIN LATERAL (
            SELECT h.sender, h."to"
            FROM outbox.messages h
            WHERE h.held AND h.status = 'pending' AND (h.sender, h."to") > (c.sender, c."to")
            ORDER BY h.sender, h."to"
            LIMIT 1) x
        WHERE c.n < p_limit
    ), visited AS MATERIALIZED (
        SELECT * FROM conversation
    ), stranded AS (
        SELECT f.id
        FROM visited c
        CROSS JOIN LATERAL (
            SELECT h.id, h.order_at, h.seq
            FROM outbox.messages h
            WHERE h.held AND h.status = 'pending' AND h.sender = c.sender AND h."to" = c."to"
            ORDER BY h.order_at, h.seq
            LIMIT 1) f
        WHERE NOT EXISTS (
            SELECT FROM outbox.messages e
            WHERE e.status IN ('pending', 'in_flight') AND e.sender = c.sender
              AND e."to" = c."to" AND e.ordered
              AND NOT (e.held AND e.status = 'pending')
              AND (e.order_at, e.seq) < (f.order_at, f.seq))
    ), done AS (
        UPDATE outbox.messages m
        SET held = false
        WHERE m.id = ANY (ARRAY(SELECT id FROM stranded)) AND m.held AND m.status = 'pending'
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM done),
           (SELECT v.sender FROM visited v ORDER BY v.n DESC LIMIT 1),
           (SELECT v."to" FROM visited v ORDER BY v.n DESC LIMIT 1)
    INTO released, last_sender, last_to;
    IF (SELECT count(*) FROM (SELECT 1 FROM outbox.messages h
                              WHERE h.held AND h.status = 'pending'
                                AND (h.sender, h."to") > (last_sender, last_to)
                              LIMIT 1) x) = 0 THEN
        last_sender := NULL;  -- the end: the next round starts again
        last_to := NULL;
    END IF;
    IF released > 0 THEN
        PERFORM pg_notify('outbox_new', '');
    END IF;
END;
$$;

-- An admin's retry goes at once, ahead of the later messages of its conversation not yet
-- sent (one in flight included: it may fail and come back): they are checked by the claim
-- again, as is the retried one (an earlier message retried before it may be live).
CREATE OR REPLACE FUNCTION outbox.retry_message(p_id uuid, p_budget integer)
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
        throttles = 0,
        held = false,
        check_order = ordered,  -- it still waits for an earlier live message (one retried)
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
    IF requeued.ordered THEN
        UPDATE outbox.messages
        SET check_order = true
        WHERE status IN ('pending', 'in_flight') AND sender = requeued.sender
          AND "to" = requeued."to"
          AND ordered AND NOT check_order
          AND (order_at, seq) > (requeued.order_at, requeued.seq);
    END IF;
    PERFORM outbox.write_events(ARRAY[requeued.id]);
    PERFORM pg_notify('outbox_new', '');
    RETURN NEXT requeued;
END;
$$;

-- Events carry the message's priority, by name.
CREATE FUNCTION outbox.priority_name(p smallint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE p WHEN 0 THEN 'high' WHEN 1 THEN 'normal' WHEN 2 THEN 'low' END;

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
                   'sender', m.sender,
                   'priority', outbox.priority_name(m.priority))
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

-- Why a pending message waits (NULL: it does not, or it is due and waits for a
-- dispatcher): an earlier live message of its conversation (the first one, whose
-- outcome holds the others), its send_at, a retry's backoff (or a throttle's wait), its
-- sender's pause, or its sender's rate.
CREATE FUNCTION outbox.waiting_for(m outbox.messages) RETURNS jsonb
LANGUAGE sql STABLE
RETURN CASE
    WHEN m.status <> 'pending' THEN NULL
    WHEN m.ordered AND (m.held OR m.check_order) AND EXISTS (
            SELECT FROM outbox.messages e
            WHERE e.status IN ('pending', 'in_flight') AND e.sender = m.sender
              AND e."to" = m."to" AND e.ordered AND (e.order_at, e.seq) < (m.order_at, m.seq))
        THEN jsonb_build_object(
            'reason', 'earlier_message',
            'task_id', (SELECT e.id FROM outbox.messages e
                        WHERE e.status IN ('pending', 'in_flight') AND e.sender = m.sender
                          AND e."to" = m."to" AND e.ordered
                          AND (e.order_at, e.seq) < (m.order_at, m.seq)
                        ORDER BY e.order_at, e.seq
                        LIMIT 1))
    WHEN m.send_at > now()
        THEN jsonb_build_object('reason', 'send_at', 'until', outbox.wire_time(m.send_at))
    WHEN m.next_attempt_at > now()
        THEN jsonb_build_object(
            'reason', CASE WHEN (SELECT a.outcome FROM outbox.attempts a
                                 WHERE a.message_id = m.id
                                 ORDER BY a.attempt DESC, a.id DESC LIMIT 1) = 'throttled'
                           THEN 'rate_limit' ELSE 'retry' END,
            'until', outbox.wire_time(m.next_attempt_at))
    WHEN (SELECT st.paused IS NOT NULL FROM outbox.sender_state st WHERE st.id = m.sender)
        THEN jsonb_build_object(
            'reason', 'sender_paused',
            'until', (SELECT outbox.wire_time(st.probe_at)
                      FROM outbox.sender_state st WHERE st.id = m.sender))
    WHEN (SELECT outbox.sender_tokens(
                     st.tokens, st.refilled_at,
                     outbox.sender_rate(st.rate_limit, st.learned_limit, st.decreased_rate,
                                        st.decreased_at, now()),
                     0.2, now()) < 1
          FROM outbox.sender_state st WHERE st.id = m.sender)
        THEN jsonb_build_object('reason', 'rate_limit')
END;

-- The message views with priority, ordered and waiting_for.
DROP FUNCTION outbox.retry_message_view(uuid, integer);
DROP VIEW outbox.message_view;
DROP VIEW outbox.listed_message;

CREATE VIEW outbox.listed_message AS
SELECT m.id, m.user_id, m.status, m."to", m.type, m.client_message_id, m.attempts,
       m.max_attempts, m.next_attempt_at, m.send_at, m.expires_at, m.last_error,
       m.provider_message_id, m.created_at, m.updated_at, m.finished_at, m.sender,
       m.throttles, outbox.priority_name(m.priority) AS priority, m.ordered,
       outbox.waiting_for(m) AS waiting_for
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

-- Parked rows are pending but not due: they wait for an earlier message, not for a
-- dispatcher (the gauges and the dashboard count them the same way).
CREATE OR REPLACE VIEW outbox.queue_summary AS
SELECT 'pending'::text AS status, count(*) AS count,
       min(next_attempt_at) FILTER (WHERE NOT held) AS oldest,
       count(*) FILTER (WHERE next_attempt_at <= now() AND NOT held) AS due_now
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
