-- The inspection views name each message's sender (002_purge_and_views.sql), as the
-- API's views do (014_sender_routing.sql): the column added last, so that a query
-- written against the old columns reads the same.

CREATE OR REPLACE VIEW outbox.stuck_messages AS
SELECT id, user_id, "to", type, attempts, max_attempts, locked_by, locked_until,
       now() - locked_until AS overdue, updated_at AS claimed_at, sender
FROM outbox.messages
WHERE status = 'in_flight' AND locked_until < now()
ORDER BY locked_until;

CREATE OR REPLACE VIEW outbox.recent_failures AS
SELECT m.id, m.user_id, m."to", m.type, m.attempts, m.max_attempts, m.finished_at,
       m.last_error,
       (SELECT a.outcome FROM outbox.attempts a
         WHERE a.message_id = m.id ORDER BY a.attempt DESC LIMIT 1) AS last_outcome,
       m.sender
FROM outbox.messages m
WHERE m.status = 'error'
ORDER BY m.finished_at DESC
LIMIT 100;
