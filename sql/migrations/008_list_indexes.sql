-- Indexes for GET /messages (the list_messages query), so that what one listing reads
-- does not grow with the table's history. Before, a status filter walked the user's
-- (user_id, id) range, or the whole table for an admin, past every row of the other
-- statuses (1 M rows: a 120 ms parallel sequential scan for a user's rare status), and
-- an admin's client_message_id read the whole idempotency index.
--   user                           messages_user_id (user_id, id)
--   user + status                  messages_user_status (user_id, status, id)
--   admin                          messages_pkey (id)
--   admin + status                 messages_status (status, id)
--   client_message_id (+ user)     messages_client_message_id (client_message_id, user_id):
--                                  one row per user, at most
--   status in_flight               messages_lease: every in-flight row, then sorted; there
--                                  are at most the dispatchers' concurrency and prefetch
--   admin + status pending         the newest rows (pending ones are mostly the newest),
--                                  or messages_due and a sort: the queue's backlog
-- Each other filter ends an index range read newest first, stopped after `limit` rows.
--
-- Cost: status is already in the partial indexes' predicates, so no status change is a
-- HOT update, and every row version enters every index whose predicate it meets. Each
-- entry the insert path writes shows in M1's batch figure (~4 µs of PostgreSQL's CPU a
-- row here), so only the user's index takes pending rows, and neither takes in-flight
-- ones (the claim writes no more than before). EXPLAIN (ANALYZE, WAL) per message,
-- insert / claim / sent: 578 / 501 / 1,456 WAL bytes before; 712 / 511 / 1,685 with
-- these; 931 / 594 / 1,769 with pending rows in both; 923 / 791 / 1,772 with full
-- indexes and a separate (client_message_id, id) one.
CREATE INDEX IF NOT EXISTS messages_user_status ON outbox.messages (user_id, status, id)
    WHERE status <> 'in_flight';
CREATE INDEX IF NOT EXISTS messages_status ON outbox.messages (status, id)
    WHERE status NOT IN ('pending', 'in_flight');

-- The idempotency index with its columns swapped, instead of one more index: an admin's
-- client_message_id filter is a range of it, and (user_id, client_message_id) lookups,
-- the inserts' uniqueness and ON CONFLICT use it as before (same columns, same name).
CREATE UNIQUE INDEX IF NOT EXISTS messages_client_message_id_swapped
    ON outbox.messages (client_message_id, user_id) WHERE client_message_id IS NOT NULL;
DROP INDEX outbox.messages_client_message_id;
ALTER INDEX outbox.messages_client_message_id_swapped RENAME TO messages_client_message_id;

-- This transaction blocks writes to messages while the indexes build (~4 s per million
-- rows here). On a large table, build them first without blocking, outside a transaction
-- (`CREATE [UNIQUE] INDEX CONCURRENTLY IF NOT EXISTS` with the names and definitions above;
-- drop any left INVALID by a failed attempt), then run `outbox migrate`, which skips them.
