-- OUTBOX_ERROR_RETENTION=0 means "keep errored messages forever", as the dispatchers'
-- scheduled purge already reads it. purge_errored (002) lacked the guard purge_sent and
-- purge_events have: called with interval '0 seconds', as the pg_cron job registered
-- by `outbox migrate --pg-cron` did, its cutoff was now() and every errored message was
-- deleted at each run. Same signature and defaults; NULL or an interval <= 0 keeps.
-- Jobs registered before this migration are safe once it is applied, without
-- registering them again.
CREATE OR REPLACE PROCEDURE outbox.purge_errored(
    older_than interval DEFAULT '7 days',
    batch_size integer DEFAULT 5000,
    INOUT deleted bigint DEFAULT 0)
LANGUAGE plpgsql AS $$
DECLARE
    cutoff constant timestamptz := now() - older_than;
    n integer;
BEGIN
    deleted := 0;
    IF older_than IS NULL OR older_than <= interval '0' THEN
        RAISE NOTICE 'outbox.purge_errored: retention 0, errored messages kept';
        RETURN;
    END IF;
    IF batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be positive, got %', batch_size;
    END IF;
    LOOP
        n := outbox.purge_errored_batch(cutoff, batch_size);
        deleted := deleted + n;
        COMMIT;
        EXIT WHEN n < batch_size;
    END LOOP;
    RAISE NOTICE 'outbox.purge_errored: % errored messages finished before % deleted',
        deleted, cutoff;
END;
$$;
