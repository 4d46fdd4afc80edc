-- Each sender within its limits across the whole cluster, and a breaker per sender.
--
-- A sender's runtime state lives in outbox.sender_state, one row per sender that has any
-- (the environment's `default` included, which has no row in outbox.senders): its token
-- bucket, its effective rate (AIMD: halved by a throttle, +10 % of its limit per second
-- back up), and its pause (by hand, or by its breaker, with the half-open probe). The
-- claim (claim_messages in sql/queries.sql) takes the bucket's tokens in the same
-- statement that claims the rows, under a row lock of the sender's state, so that 1 or 10
-- dispatchers together keep to the limit. A sender without a state row is unlimited and
-- active. outbox.senders keeps the configuration; its rate_limit is copied here by a
-- trigger (the bucket's row is updated by every claim: it must not fire the senders'
-- NOTIFY, which makes every process read the senders again).

CREATE TABLE outbox.sender_state (
    id              text PRIMARY KEY,
    rate_limit      double precision CHECK (rate_limit > 0),  -- configured; NULL: unlimited
    -- An unlimited sender's limit learned from a throttle: its rate measured then.
    learned_limit   double precision CHECK (learned_limit > 0),
    decreased_rate  double precision,   -- the rate the last throttle left (AIMD)
    decreased_at    timestamptz,        -- and when: NULL, never throttled (the full rate)
    -- The bucket: `tokens` as of `refilled_at`; a new bucket is full.
    tokens          double precision NOT NULL DEFAULT 'Infinity',
    refilled_at     timestamptz NOT NULL DEFAULT now(),
    paused          jsonb,              -- NULL, or {reason, code, since, until, manual}
    probe_at        timestamptz,        -- a breaker's pause: when one message may probe
    pause_seconds   double precision,   -- the breaker's period, doubled by a failed probe
    probe_id        uuid,               -- the message out as the probe
    probe_until     timestamptz         -- its lease: past it, another message may probe
);

-- The pause moves here from outbox.senders, so that `default` can be paused too.
INSERT INTO outbox.sender_state (id, rate_limit, paused)
SELECT id, rate_limit, paused FROM outbox.senders;
INSERT INTO outbox.sender_state (id) VALUES ('default') ON CONFLICT DO NOTHING;

-- The rate a sender keeps to at `p_at` (NULL: unlimited): its limit (configured, else
-- learned), or, after a throttle, the halved rate growing back by 10 % of the limit per
-- second up to it. A learned limit is grown past (the provider's real limit is unknown)
-- and lifted once the rate reaches ten times it.
CREATE FUNCTION outbox.sender_rate(
    p_limit double precision, p_learned double precision, p_decreased double precision,
    p_since timestamptz, p_at timestamptz)
RETURNS double precision LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p_limit IS NULL AND p_learned IS NULL THEN NULL
        WHEN p_since IS NULL THEN COALESCE(p_limit, p_learned)
        WHEN p_limit IS NOT NULL
            THEN LEAST(p_limit, p_decreased
                       + 0.1 * p_limit * GREATEST(0, EXTRACT(epoch FROM p_at - p_since)::float8))
        ELSE NULLIF(LEAST(10 * p_learned, p_decreased
                          + 0.1 * p_learned * GREATEST(0, EXTRACT(epoch FROM p_at - p_since)::float8)),
                    10 * p_learned)
    END
$$;

-- The tokens a bucket holds at `p_at`: refilled at `p_rate` since `p_refilled`, up to its
-- capacity, `p_burst` seconds' worth of the rate (at least one token).
CREATE FUNCTION outbox.sender_tokens(
    p_tokens double precision, p_refilled timestamptz, p_rate double precision,
    p_burst double precision, p_at timestamptz)
RETURNS double precision LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT LEAST(GREATEST(1, p_rate * p_burst),
                 p_tokens + p_rate * GREATEST(0, EXTRACT(epoch FROM p_at - p_refilled)::float8))
$$;

-- The configuration's limit, copied: a sender created gets a fresh state (a full bucket,
-- not paused), one whose limit changes starts again at it, a deleted one loses its state.
CREATE FUNCTION outbox.sync_sender_state() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        DELETE FROM outbox.sender_state WHERE id = OLD.id;
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        DELETE FROM outbox.sender_state WHERE id = NEW.id;  -- a bare row (see below)
        INSERT INTO outbox.sender_state (id, rate_limit) VALUES (NEW.id, NEW.rate_limit);
    ELSIF NEW.rate_limit IS DISTINCT FROM OLD.rate_limit THEN
        PERFORM outbox.set_sender_limit(NEW.id, NEW.rate_limit);
    END IF;
    RETURN NULL;
END;
$$;

-- A sender's configured limit (the trigger's, and the dispatchers' for `default`, whose
-- limit the environment sets): a change starts the rate again at the limit, full bucket.
CREATE FUNCTION outbox.set_sender_limit(p_id text, p_limit double precision)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox.sender_state (id, rate_limit) VALUES (p_id, p_limit)
    ON CONFLICT (id) DO UPDATE
    SET rate_limit = EXCLUDED.rate_limit, learned_limit = NULL, decreased_rate = NULL,
        decreased_at = NULL, tokens = 'Infinity', refilled_at = now()
    WHERE outbox.sender_state.rate_limit IS DISTINCT FROM EXCLUDED.rate_limit;
END;
$$;

CREATE TRIGGER senders_state
    AFTER INSERT OR UPDATE OR DELETE ON outbox.senders
    FOR EACH ROW EXECUTE FUNCTION outbox.sync_sender_state();

ALTER TABLE outbox.senders DROP COLUMN paused;

-- How many times a message was throttled (each spends no attempt); past
-- OUTBOX_MAX_THROTTLES it ends `error` "throttled".
ALTER TABLE outbox.messages ADD COLUMN throttles integer NOT NULL DEFAULT 0;

-- The claim walks the senders that have pending rows (a skip scan: one descent per
-- sender) and takes each one's due rows oldest first: a limited or paused sender's backlog
-- is never read past by the others' claims. It replaces messages_due (next_attempt_at),
-- which the planner preferred even for one sender's rows (filtering the others' out, a
-- whole backlog read past): one pending index, as before, so inserts cost what they did.
CREATE INDEX messages_sender_due ON outbox.messages (sender, next_attempt_at)
    WHERE status = 'pending';
DROP INDEX outbox.messages_due;
-- Pending messages that can expire (few): the reaper ends those whose time has passed,
-- whether their sender can send or not (a paused or limited sender's never reach a claim).
CREATE INDEX messages_pending_expiry ON outbox.messages (expires_at)
    WHERE status = 'pending' AND expires_at IS NOT NULL;

-- Pause a sender (by hand, or by its breaker until p_until, when one message may probe)
-- with its `sender_paused` event: `since` kept when it was already paused; the event only
-- when the pause is new or changed. A pause by hand is never replaced by the breaker's.
-- Returns its id, or nothing when there is no such sender. Its NOTIFY makes every
-- process read the senders again.
DROP FUNCTION outbox.pause_sender(text, text, text, timestamptz, boolean);
CREATE FUNCTION outbox.pause_sender(
    p_id text, p_reason text, p_code text, p_until timestamptz, p_manual boolean)
RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
    before jsonb;
    after jsonb;
BEGIN
    IF p_id <> 'default' AND NOT EXISTS (SELECT FROM outbox.senders WHERE id = p_id) THEN
        RETURN;
    END IF;
    INSERT INTO outbox.sender_state (id) VALUES (p_id) ON CONFLICT DO NOTHING;
    SELECT paused INTO before FROM outbox.sender_state WHERE id = p_id FOR UPDATE;
    IF NOT p_manual AND (before ->> 'manual')::boolean THEN
        RETURN NEXT p_id;  -- paused by hand: only a resume by hand ends it
        RETURN;
    END IF;
    after := jsonb_build_object(
        'reason', p_reason,
        'code', p_code,
        'since', COALESCE(before -> 'since', to_jsonb(outbox.wire_time(now()))),
        'until', outbox.wire_time(p_until),
        'manual', p_manual);
    UPDATE outbox.sender_state
    SET paused = after,
        probe_at = CASE WHEN p_manual THEN NULL ELSE p_until END,
        probe_id = NULL,
        probe_until = NULL
    WHERE id = p_id;
    IF before IS DISTINCT FROM after THEN
        PERFORM outbox.write_sender_event(p_id, 'sender_paused', jsonb_build_object(
            'reason', p_reason, 'code', p_code, 'since', after -> 'since',
            'until', after -> 'until', 'manual', p_manual));
        PERFORM pg_notify('outbox_senders', '');
    END IF;
    RETURN NEXT p_id;
END;
$$;

-- Resume a sender with its `sender_resumed` event (only when it was paused), its breaker
-- reset. Returns its id, or nothing when there is no such sender.
DROP FUNCTION outbox.resume_sender(text);
CREATE FUNCTION outbox.resume_sender(p_id text) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    before jsonb;
BEGIN
    IF p_id <> 'default' AND NOT EXISTS (SELECT FROM outbox.senders WHERE id = p_id) THEN
        RETURN;
    END IF;
    SELECT paused INTO before FROM outbox.sender_state WHERE id = p_id FOR UPDATE;
    IF before IS NOT NULL THEN
        UPDATE outbox.sender_state
        SET paused = NULL, probe_at = NULL, pause_seconds = NULL, probe_id = NULL,
            probe_until = NULL
        WHERE id = p_id;
        PERFORM outbox.write_sender_event(p_id, 'sender_resumed', jsonb_build_object(
            'reason', NULL, 'code', NULL, 'paused_since', before -> 'since'));
        PERFORM pg_notify('outbox_senders', '');
        -- Its messages are due again: wake the dispatchers as an insert would.
        PERFORM pg_notify('outbox_new', '');
    END IF;
    RETURN NEXT p_id;
END;
$$;

-- What the outcomes of one batch say about their senders (complete_attempts calls it for
-- a batch with a throttle, a sender-level failure or a probe's outcome):
-- - a pair throttle (131056) holds the other pending messages of that sender to that
--   recipient as long as the throttled one;
-- - a throttle halves the sender's rate (at least 1/s) and empties its bucket, once per
--   burst: only a throttled row claimed after the last decrease decreases it again (the
--   rows already claimed when it fell tell of the old rate; both times are the
--   database's, whatever the dispatchers' clocks say). An unlimited sender gets
--   a limit first: its rate measured over the last 2 s (attempts finished);
-- - a sender-level failure pauses the sender (the breaker: OUTBOX_SENDER_PAUSE, doubled
--   by each failed probe up to OUTBOX_SENDER_PAUSE_MAX, from the outcome's pause_base and
--   pause_max); a failure of the probe pauses it again for twice as long;
-- - the probe's success (or a permanent failure: the account could send) resumes it; a
--   probe handed back uncalled, or expired, lets another message probe at once; any other
--   end (a timeout, a 5xx, a throttle) waits the same period again for the next probe.
CREATE FUNCTION outbox.sender_outcome_rows(p_outcomes json, p_applied uuid[])
RETURNS TABLE (id uuid, sender text, outcome text, throttle text, error text, code text,
               next_attempt_at timestamptz, claimed_at timestamptz, pause_base float8,
               pause_max float8)
LANGUAGE sql IMMUTABLE AS $$
    SELECT o.id, o.sender, o.outcome, o.throttle, o.error, o.code, o.next_attempt_at,
           o.claimed_at, o.pause_base, o.pause_max
    FROM json_to_recordset(p_outcomes)
        AS o(id uuid, sender text, outcome text, throttle text, error text, code text,
             next_attempt_at timestamptz, claimed_at timestamptz, pause_base float8,
             pause_max float8)
    WHERE o.id = ANY (p_applied)
$$;

CREATE FUNCTION outbox.apply_sender_outcomes(p_outcomes json, p_applied uuid[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    hit record;
    period double precision;
BEGIN
    -- The senders' states first, locked in id order: two batches that touch the same
    -- senders (throttles, pauses, probes) never wait for each other in a cycle.
    INSERT INTO outbox.sender_state (id)
    SELECT DISTINCT o.sender FROM outbox.sender_outcome_rows(p_outcomes, p_applied) o
    WHERE o.outcome = 'throttled' AND o.throttle = 'rate'
    ORDER BY 1
    ON CONFLICT DO NOTHING;
    PERFORM 1 FROM outbox.sender_state
    WHERE id IN (SELECT o.sender FROM outbox.sender_outcome_rows(p_outcomes, p_applied) o)
    ORDER BY id
    FOR NO KEY UPDATE;

    -- Pair throttles: the same recipient's other pending messages wait as long. Rows
    -- another transaction holds are skipped: a claim taking them (they are called, and
    -- throttled in turn), or another batch making them pending with its own hold (two
    -- batches that waited for each other's rows would deadlock).
    UPDATE outbox.messages m
    SET next_attempt_at = h.until
    FROM (SELECT o.sender, t."to", max(o.next_attempt_at) AS until
          FROM outbox.sender_outcome_rows(p_outcomes, p_applied) o
          JOIN outbox.messages t ON t.id = o.id
          WHERE o.outcome = 'throttled' AND o.throttle = 'pair'
          GROUP BY o.sender, t."to") h
    WHERE m.ctid IN (SELECT p.ctid FROM outbox.messages p
                     WHERE p.status = 'pending' AND p.sender = h.sender AND p."to" = h."to"
                       AND p.next_attempt_at < h.until
                     FOR UPDATE SKIP LOCKED)
      AND m.next_attempt_at < h.until;

    -- Rate throttles: AIMD's decrease.
    FOR hit IN
        SELECT o.sender, max(o.claimed_at) AS claimed_at
        FROM outbox.sender_outcome_rows(p_outcomes, p_applied) o
        WHERE o.outcome = 'throttled' AND o.throttle = 'rate'
        GROUP BY o.sender
    LOOP
        UPDATE outbox.sender_state s
        SET learned_limit = CASE WHEN s.rate_limit IS NULL
                                  AND outbox.sender_rate(NULL, s.learned_limit, s.decreased_rate,
                                                         s.decreased_at, now()) IS NULL
                                 THEN outbox.measured_rate(s.id) ELSE s.learned_limit END,
            decreased_rate = GREATEST(1, COALESCE(
                outbox.sender_rate(s.rate_limit, s.learned_limit, s.decreased_rate,
                                   s.decreased_at, now()),
                outbox.measured_rate(s.id)) / 2),
            decreased_at = now(),
            tokens = 0,
            refilled_at = GREATEST(s.refilled_at, now())  -- never back (see the claim)
        WHERE s.id = hit.sender
          AND (s.decreased_at IS NULL OR hit.claimed_at > s.decreased_at);
    END LOOP;

    -- Sender-level failures: the breaker.
    FOR hit IN
        SELECT DISTINCT ON (o.sender) o.sender, o.error, o.code, o.pause_base, o.pause_max,
               s.paused, s.pause_seconds, s.probe_id,
               bool_or(o.id = s.probe_id) OVER (PARTITION BY o.sender) AS probe_failed
        FROM outbox.sender_outcome_rows(p_outcomes, p_applied) o
        LEFT JOIN outbox.sender_state s ON s.id = o.sender
        WHERE o.outcome = 'sender'
        ORDER BY o.sender, o.claimed_at
    LOOP
        IF hit.probe_failed THEN
            period := LEAST(hit.pause_max, COALESCE(hit.pause_seconds, hit.pause_base) * 2);
        ELSIF hit.paused IS NULL THEN
            period := hit.pause_base;
        ELSE
            CONTINUE;  -- paused already: the calls that were out when it paused
        END IF;
        PERFORM outbox.pause_sender(hit.sender, hit.error, hit.code,
                                    now() + make_interval(secs => period), false);
        UPDATE outbox.sender_state SET pause_seconds = period
        WHERE id = hit.sender AND NOT COALESCE((paused ->> 'manual')::boolean, false);
    END LOOP;

    -- The probes' other ends.
    FOR hit IN
        SELECT o.sender, o.outcome, s.paused ->> 'reason' AS reason, s.paused ->> 'code' AS code,
               COALESCE(s.pause_seconds, 60) AS period
        FROM outbox.sender_outcome_rows(p_outcomes, p_applied) o
        JOIN outbox.sender_state s ON s.id = o.sender AND s.probe_id = o.id
        WHERE o.outcome <> 'sender'
    LOOP
        IF hit.outcome IN ('sent', 'permanent') THEN
            PERFORM outbox.resume_sender(hit.sender);
        ELSIF hit.outcome IN ('interrupted', 'expired') THEN
            -- Never called (handed back, or expired first): another message probes now.
            UPDATE outbox.sender_state SET probe_id = NULL, probe_until = NULL
            WHERE id = hit.sender;
        ELSE
            -- Called, but it tells nothing of the account (a timeout, a 5xx, a
            -- throttle): the next probe after the same period, not doubled.
            PERFORM outbox.pause_sender(hit.sender, hit.reason, hit.code,
                                        now() + make_interval(secs => hit.period), false);
        END IF;
    END LOOP;
END;
$$;

-- An unlimited sender's rate as measured when it is first throttled: its attempts that
-- finished in the last 2 s, per second (at least 1).
CREATE FUNCTION outbox.measured_rate(p_sender text) RETURNS double precision
LANGUAGE sql STABLE AS $$
    SELECT GREATEST(1, count(*) / 2.0)
    FROM outbox.attempts a
    JOIN outbox.messages m ON m.id = a.message_id
    WHERE a.finished_at > now() - interval '2 seconds' AND m.sender = p_sender
$$;

-- complete_attempts (003_events.sql) with throttles: a throttled attempt spends no attempt
-- (refunded) and counts in `throttles`; it is no news for the client while the message
-- stays pending (a message that ends `error` "throttled" has its `failed`). The outcomes'
-- news for their senders goes to apply_sender_outcomes, for the batches that carry any.
CREATE OR REPLACE FUNCTION outbox.complete_attempts(p_outcomes json, p_dispatcher text)
RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
DECLARE
    applied uuid[];
    eventful uuid[];
    senders_news boolean;
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
            throttles = m.throttles + CASE WHEN o.outcome = 'throttled' THEN 1 ELSE 0 END,
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

-- Pending messages whose expires_at has passed end `error` "expired", uncalled, their
-- attempt recorded as the executor records an expiry (refunded: `attempts` unchanged),
-- each with its `failed` event: the reaper's round, for the messages no claim takes
-- (their sender paused, or out of tokens). Returns their ids.
CREATE FUNCTION outbox.expire_pending(p_limit int) RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
DECLARE
    expired_ids uuid[];
BEGIN
    WITH expired AS (
        SELECT id
        FROM outbox.messages
        WHERE status = 'pending' AND expires_at IS NOT NULL AND expires_at <= now()
        ORDER BY expires_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ),
    ended AS (
        UPDATE outbox.messages m
        SET status = 'error', last_error = 'expired', finished_at = now(), updated_at = now()
        FROM expired e
        WHERE m.id = e.id
        RETURNING m.id, m.attempts
    ),
    recorded AS (
        INSERT INTO outbox.attempts
            (message_id, attempt, dispatcher, started_at, finished_at, outcome, error)
        SELECT id, attempts + 1, 'reaper', now(), now(), 'expired', 'expired'
        FROM ended
        RETURNING message_id
    )
    SELECT array_agg(message_id ORDER BY message_id) INTO expired_ids FROM recorded;
    PERFORM outbox.write_events(expired_ids);
    RETURN QUERY SELECT unnest(expired_ids);
END;
$$;

-- An admin's retry (004_admin_retry.sql) also gives a fresh throttle budget.
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
    PERFORM outbox.write_events(ARRAY[requeued.id]);
    PERFORM pg_notify('outbox_new', '');
    RETURN NEXT requeued;
END;
$$;

-- The message views (014_sender_routing.sql) with `throttles`, the column added last.
DROP FUNCTION outbox.retry_message_view(uuid, integer);
DROP VIEW outbox.message_view;

CREATE OR REPLACE VIEW outbox.listed_message AS
SELECT m.id, m.user_id, m.status, m."to", m.type, m.client_message_id, m.attempts,
       m.max_attempts, m.next_attempt_at, m.send_at, m.expires_at, m.last_error,
       m.provider_message_id, m.created_at, m.updated_at, m.finished_at, m.sender,
       m.throttles
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
