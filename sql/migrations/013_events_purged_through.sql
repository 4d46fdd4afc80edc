-- What a feed checks `?since=` against once every event has been purged: the newest id
-- ever deleted. Before, an empty table answered with the id sequence's next value,
-- which also counts ids taken by transactions not yet committed, so a client resuming
-- from the newest event while another was being written could be told its events were
-- purged (4410). Kept by a trigger, so any delete counts: the purge's, or one by hand.
CREATE TABLE IF NOT EXISTS outbox.events_purged (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    through  bigint NOT NULL  -- every event id up to this one is gone
);

-- Today's databases: what the sequence handed out before the oldest event kept is gone;
-- with no event kept, all it handed out (what the old answer assumed).
INSERT INTO outbox.events_purged (through)
SELECT COALESCE(
    (SELECT min(id) - 1 FROM outbox.events),
    (SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END
     FROM outbox.events_id_seq))
ON CONFLICT (only_row) DO NOTHING;

CREATE OR REPLACE FUNCTION outbox.note_events_purged() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- GREATEST ignores the NULL of a delete that removed nothing.
    UPDATE outbox.events_purged SET through = GREATEST(through, (SELECT max(id) FROM gone));
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS events_purged ON outbox.events;
CREATE TRIGGER events_purged AFTER DELETE ON outbox.events
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.note_events_purged();
