-- Room on each page of messages for the versions a delivery writes (claimed, then
-- sent). Full pages send every update to whatever page the free-space map offers,
-- which in a table with history is a cold page anywhere in it: make bench's cost
-- growth run (1.1 M old rows, shared_buffers 128 MB) drained 11,300–12,700 msg/s
-- with full pages and 16,000–17,100 with this (empty table: about the same).
ALTER TABLE outbox.messages SET (fillfactor = 80);
