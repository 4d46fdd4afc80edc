-- A message as the API shows it, written once: the listing's columns
-- (`listed_message`), and those with the message's attempts (`message_view`) for GET and
-- an admin's retry. outbox/store/messages.py maps each column by name onto a field of its
-- row classes (ListedRow, MessageRow): a column added here and not there fails the first
-- query, it cannot go unnoticed. Plain views over outbox.messages: a query on them is
-- planned as on the table (the same indexes), and a column it does not read, such as
-- `history` for a listing, is never computed.

CREATE VIEW outbox.listed_message AS
SELECT m.id, m.user_id, m.status, m."to", m.type, m.client_message_id, m.attempts,
       m.max_attempts, m.next_attempt_at, m.send_at, m.expires_at, m.last_error,
       m.provider_message_id, m.created_at, m.updated_at, m.finished_at
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

-- An admin's retry (retry_message, 004_admin_retry.sql) answered with the message's view
-- as the retry left it, in one statement. The view is read by a statement of its own,
-- after the retry's: one statement's snapshot would not see the row it changed. The
-- row stays locked by this transaction until it commits, so no claim can add an attempt
-- in between. No row when the message was not in a state to retry.
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
