-- Named queries: each under a `-- name: <name>` header, loaded by outbox/store.py.

-- name: insert_message
-- One round trip: inserts, or on a resend of the same client_message_id with the
-- same request returns the original row (its id differs from the one proposed);
-- a different request under the same id returns nothing (a conflict).
INSERT INTO outbox.messages AS m
    (id, user_id, client_message_id, "to", type, payload, request_hash, max_attempts,
     send_at, expires_at, next_attempt_at)
VALUES
    (%(id)s, %(user_id)s, %(client_message_id)s, %(to)s, %(type)s, %(payload)s,
     %(request_hash)s, %(max_attempts)s, %(send_at)s, %(expires_at)s,
     GREATEST(now(), COALESCE(%(send_at)s, now())))
ON CONFLICT (user_id, client_message_id) WHERE client_message_id IS NOT NULL
DO UPDATE SET updated_at = m.updated_at
    WHERE m.request_hash = EXCLUDED.request_hash
RETURNING m.id;

-- name: insert_messages
-- The batch form of insert_message: one statement for up to 1,000 rows.
INSERT INTO outbox.messages AS m
    (id, user_id, client_message_id, "to", type, payload, request_hash, max_attempts,
     send_at, expires_at, next_attempt_at)
SELECT id, %(user_id)s, client_message_id, "to", type, payload::jsonb, request_hash,
       %(max_attempts)s, send_at, expires_at, GREATEST(now(), COALESCE(send_at, now()))
FROM unnest(%(ids)s::uuid[], %(client_message_ids)s::text[], %(tos)s::text[], %(types)s::text[],
            %(payloads)s::text[], %(request_hashes)s::bytea[], %(send_ats)s::timestamptz[],
            %(expires_ats)s::timestamptz[])
    AS batch(id, client_message_id, "to", type, payload, request_hash, send_at, expires_at)
ON CONFLICT (user_id, client_message_id) WHERE client_message_id IS NOT NULL
DO UPDATE SET updated_at = m.updated_at
    WHERE m.request_hash = EXCLUDED.request_hash
RETURNING m.id, m.client_message_id;

-- name: get_message
SELECT m.id, m.status, m."to", m.type, m.client_message_id, m.attempts, m.max_attempts,
       m.next_attempt_at, m.send_at, m.expires_at, m.last_error, m.provider_message_id,
       m.created_at, m.updated_at, m.finished_at,
       COALESCE(
           (SELECT jsonb_agg(jsonb_build_object(
                       'attempt', a.attempt,
                       'started_at', a.started_at,
                       'finished_at', a.finished_at,
                       'outcome', a.outcome,
                       'error', a.error) ORDER BY a.id)
            FROM outbox.attempts a WHERE a.message_id = m.id),
           '[]'::jsonb) AS history
FROM outbox.messages m
WHERE m.id = %(id)s AND (%(user_id)s::text IS NULL OR m.user_id = %(user_id)s::text);

-- name: cancel_message
UPDATE outbox.messages
SET status = 'cancelled', finished_at = now(), updated_at = now()
WHERE id = %(id)s AND status = 'pending'
  AND (%(user_id)s::text IS NULL OR user_id = %(user_id)s::text)
RETURNING id;

-- name: schema_version
SELECT COALESCE(max(version), 0) FROM outbox.schema_migrations;

-- name: list_messages
-- Keyset pagination, newest first (ids are UUIDv7, so id order is creation order).
-- Run unprepared so the planner folds away the filters that are NULL.
SELECT m.id, m.status, m."to", m.type, m.client_message_id, m.attempts, m.max_attempts,
       m.next_attempt_at, m.send_at, m.expires_at, m.last_error, m.provider_message_id,
       m.created_at, m.updated_at, m.finished_at, '[]'::jsonb AS history
FROM outbox.messages m
WHERE (%(user_id)s::text IS NULL OR m.user_id = %(user_id)s::text)
  AND (%(status)s::text IS NULL OR m.status = %(status)s::text)
  AND (%(client_message_id)s::text IS NULL OR m.client_message_id = %(client_message_id)s::text)
  AND (%(after)s::uuid IS NULL OR m.id < %(after)s::uuid)
ORDER BY m.id DESC
LIMIT %(limit)s;
