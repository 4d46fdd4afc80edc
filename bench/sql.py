"""SQL of the bench: helpers, pre-fills shaped like the API's rows, and the pgbench floor."""

from __future__ import annotations

from bench.common import TEXT

# Installed in schema `bench` of the bench database (never in `outbox`).
HELPERS = """
CREATE SCHEMA IF NOT EXISTS bench;
-- A UUIDv7 for a given time, like the API's task ids (time-ordered, random tail).
CREATE OR REPLACE FUNCTION bench.uuid7(ts timestamptz DEFAULT clock_timestamp()) RETURNS uuid
LANGUAGE sql VOLATILE AS $$
  SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
         PLACING substring(int8send(floor(extract(epoch FROM ts) * 1000)::bigint) FROM 3)
         FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid
$$;
"""

TRUNCATE = "TRUNCATE outbox.messages, outbox.attempts, outbox.events"

# m2_limited's view of the token bucket: when each row was claimed, by the claim's own
# clock (the `updated_at` it sets is the now() its tokens are counted at), recorded by a
# row trigger in schema `bench` for that step only.
CLAIM_TIMES_ON = """
CREATE TABLE IF NOT EXISTS bench.claims (id uuid NOT NULL, claimed_at timestamptz NOT NULL);
TRUNCATE bench.claims;
CREATE OR REPLACE FUNCTION bench.record_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench.claims VALUES (NEW.id, NEW.updated_at);
    RETURN NULL;
END;
$$;
CREATE OR REPLACE TRIGGER bench_claims AFTER UPDATE ON outbox.messages FOR EACH ROW
    WHEN (OLD.status = 'pending' AND NEW.status = 'in_flight')
    EXECUTE FUNCTION bench.record_claim();
"""
CLAIM_TIMES_OFF = "DROP TRIGGER IF EXISTS bench_claims ON outbox.messages"
CLAIM_TIMES = "SELECT extract(epoch FROM claimed_at) FROM bench.claims ORDER BY claimed_at"
VACUUM = [
    "VACUUM ANALYZE outbox.messages",
    "VACUUM ANALYZE outbox.attempts",
    "VACUUM ANALYZE outbox.events",
]

# The API stores `text` as {"body", "preview_url"}; request_hash is a sha256.
_PAYLOAD = f"""jsonb_build_object('body', '{TEXT}'::text, 'preview_url', false)"""


# The i-th row's own recipient, as bench.common.recipient(i) spells it.
RECIPIENT = "'5511' || lpad(i::text, 9, '0')"
# The columns of order and priority (sql/migrations/017_order_priority_fairness.sql):
# a pre-fill names them only on a schema that has them (Database.has_column).
ORDER_COLUMNS = ("priority", "ordered", "check_order")


def prefill_pending(
    sender: str = "'default'",
    to: str = RECIPIENT,
    user: str = "'bench'",
    columns: dict[str, str] | None = None,
) -> str:
    """N due pending rows, as `POST /send/batch` would leave them: the SQL expressions
    `sender`, `to`, `user` (over the row number i) and any other `columns` (name →
    expression); each row its own recipient unless `to` says otherwise. Ordered (the
    column's default) without check_order (its default): what the insert sets when the
    conversation has no live earlier message. `seq` (a default) in i's order, as the
    insert takes it in array order."""
    extra = columns or {}
    names = "".join(f", {name}" for name in extra)
    values = "".join(f", {value}" for value in extra.values())
    return f"""
INSERT INTO outbox.messages (id, user_id, client_message_id, "to", type, payload, request_hash,
                             max_attempts, next_attempt_at, created_at, updated_at,
                             sender{names})
SELECT bench.uuid7(), {user}, 'c-' || lpad(i::text, 10, '0'), {to}, 'text', {_PAYLOAD},
       sha256(convert_to('c-' || i, 'UTF8')), 4, now(), now(), now(), {sender}{values}
FROM generate_series(1, %(n)s) AS i
ORDER BY i
"""


PREFILL_PENDING = prefill_pending()
# The same rows spread round-robin over the senders of STORE_SENDERS.
PREFILL_PENDING_SENDERS = prefill_pending(sender="'bench-' || mod(i, %(senders)s)")
# The same rows, all from the sender %(sender)s.
PREFILL_PENDING_FROM = prefill_pending(sender="%(sender)s")
# The same rows from %(users)s users (bench-u0000, …), %(per_user)s each, in blocks.
PREFILL_PENDING_USERS = prefill_pending(
    user="'bench-u' || lpad(((i - 1) / %(per_user)s::int)::text, 4, '0')"
)
# One conversation: every row to one number (the insert sets check_order on all but the
# first, which found no live earlier one). `check_order`: whether the schema has it.
CONVERSATION_TO = "5511900000000"


def prefill_conversation(check_order: bool) -> str:
    return prefill_pending(
        to=f"'{CONVERSATION_TO}'", columns={"check_order": "i > 1"} if check_order else None
    )


# A `low` campaign from the sender %(sender)s and the user `campaign`.
PREFILL_CAMPAIGN = prefill_pending(
    sender="%(sender)s", user="'campaign'", columns={"priority": "2"}
)

# %(senders)s stored senders bench-0, bench-1, …, as `PUT /senders/{id}` would store a
# `fake` one with no limit, no latency and no failures (no credentials to encrypt).
STORE_SENDERS = """
INSERT INTO outbox.senders (id, provider, settings, secrets, secret_fields, rate_limit, users)
SELECT 'bench-' || k, 'fake', '{"latency_ms": 0.0, "failure_rate": 0.0}', NULL, '{}', NULL,
       '{*}'
FROM generate_series(0, %(senders)s - 1) AS k
"""
DROP_SENDERS = "DELETE FROM outbox.senders WHERE starts_with(id, 'bench-')"

# Cost growth: history older than the run, spread over the last days (ids time-ordered by
# their creation time), 1,000 users; every error row and every 10th sent row has an attempt
# row and a status event, as the dispatcher would have left them.
PREFILL_OLD_SENT = f"""
INSERT INTO outbox.messages (id, user_id, client_message_id, "to", type, payload, request_hash,
                             status, attempts, max_attempts, next_attempt_at,
                             provider_message_id, created_at, updated_at, finished_at)
SELECT bench.uuid7(t), 'old-' || mod(i, 1000), 'old-' || i, {RECIPIENT}, 'text', {_PAYLOAD},
       sha256(convert_to('old-' || i, 'UTF8')), 'sent', 1, 4, t, 'fake-' || md5(i::text),
       t, t + interval '1 second', t + interval '1 second'
FROM (SELECT i, now() - interval '8 days' + i * (interval '7 days' / %(n)s) AS t
      FROM generate_series(1, %(n)s) AS i) AS s
"""

PREFILL_OLD_ERROR = f"""
INSERT INTO outbox.messages (id, user_id, client_message_id, "to", type, payload, request_hash,
                             status, attempts, max_attempts, next_attempt_at, last_error,
                             created_at, updated_at, finished_at)
SELECT bench.uuid7(t), 'old-' || mod(i, 1000), 'olderr-' || i, {RECIPIENT}, 'text',
       {_PAYLOAD},
       sha256(convert_to('olderr-' || i, 'UTF8')), 'error', 4, 4, t,
       'permanent: invalid recipient', t, t + interval '10 minutes', t + interval '10 minutes'
FROM (SELECT i, now() - interval '6 days' + i * (interval '5 days' / %(n)s) AS t
      FROM generate_series(1, %(n)s) AS i) AS s
"""

_OLD_WITH_HISTORY = """
FROM outbox.messages
WHERE status = 'error' OR (status = 'sent' AND right(client_message_id, 1) = '0')
"""

PREFILL_OLD_ATTEMPTS = f"""
INSERT INTO outbox.attempts (message_id, attempt, dispatcher, started_at, finished_at, outcome,
                             error, latency_ms)
SELECT id, attempts, 'old-dispatcher', finished_at - interval '5 ms', finished_at,
       CASE status WHEN 'sent' THEN 'sent' ELSE 'permanent' END, last_error, 5.0
{_OLD_WITH_HISTORY}
"""

PREFILL_OLD_EVENTS = f"""
INSERT INTO outbox.events (message_id, user_id, event, data, created_at)
SELECT id, user_id, 'message_sent',
       jsonb_build_object('message_id', id,
                          'status', CASE status WHEN 'sent' THEN 'queued' ELSE 'failed' END,
                          'to', "to", 'timestamp', finished_at, 'error', last_error),
       finished_at
{_OLD_WITH_HISTORY}
"""

# Drain complete when neither partial index (messages_due, messages_lease) has a row:
# two index-only probes, cheap even with 1.1 M finished rows in the table.
UNFINISHED = """
SELECT EXISTS (SELECT 1 FROM outbox.messages WHERE status = 'pending')
    OR EXISTS (SELECT 1 FROM outbox.messages WHERE status = 'in_flight')
"""

# Floor: a table shaped like outbox.messages (columns, defaults, checks, every index; no
# NOTIFY trigger), one single-row INSERT per transaction, as the API's insert would be.
FLOOR_TABLE = """
DROP TABLE IF EXISTS bench.floor_messages;
CREATE TABLE bench.floor_messages (LIKE outbox.messages INCLUDING ALL);
"""

# The keys are random over 10^18, not 10^12: two runs of one sitting aborted on a
# duplicate key with the smaller range (a run holds up to ~170,000 rows).
FLOOR_SCRIPT = f"""\\set cid random(1, 999999999999999999)
\\set to random(1, 999999999)
INSERT INTO bench.floor_messages (id, user_id, client_message_id, "to", type, payload, \
request_hash, max_attempts, next_attempt_at) VALUES (bench.uuid7(), 'bench', \
'c-' || lpad(:cid::text, 18, '0'), '5511' || lpad(:to::text, 9, '0'), 'text', {_PAYLOAD}, \
sha256(convert_to('c-' || :cid, 'UTF8')), 4, now());
"""
