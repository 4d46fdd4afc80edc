-- The outbox: messages, one row per delivery attempt, and the durable event log.

CREATE TABLE outbox.messages (
    id                  uuid PRIMARY KEY,              -- the task_id (UUIDv7: time-ordered)
    user_id             text NOT NULL,                 -- JWT `sub` of the sender
    client_message_id   text,
    "to"                text NOT NULL,                 -- digits only
    type                text NOT NULL
        CHECK (type IN ('text', 'template', 'image', 'document', 'audio', 'video')),
    payload             jsonb NOT NULL,                -- the validated content of `type`
    request_hash        bytea NOT NULL,                -- normalised request, for idempotent replays
    status              text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'in_flight', 'sent', 'error', 'cancelled')),
    attempts            integer NOT NULL DEFAULT 0,
    max_attempts        integer NOT NULL CHECK (max_attempts > 0),
    send_at             timestamptz,
    expires_at          timestamptz,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    locked_by           text,
    locked_until        timestamptz,
    last_error          text,
    provider_message_id text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz
);

-- Idempotency: one message per (user, client_message_id).
CREATE UNIQUE INDEX messages_client_message_id
    ON outbox.messages (user_id, client_message_id)
    WHERE client_message_id IS NOT NULL;

-- The claim query: due pending rows, oldest due first.
CREATE INDEX messages_due ON outbox.messages (next_attempt_at) WHERE status = 'pending';

-- The lease reaper: in-flight rows by lease expiry.
CREATE INDEX messages_lease ON outbox.messages (locked_until) WHERE status = 'in_flight';

-- A user's messages, newest first (ids are time-ordered), for keyset pagination.
CREATE INDEX messages_user_id ON outbox.messages (user_id, id);

-- The purge: errored rows by the time they failed.
CREATE INDEX messages_error_finished ON outbox.messages (finished_at) WHERE status = 'error';

CREATE TABLE outbox.attempts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id      uuid NOT NULL REFERENCES outbox.messages (id) ON DELETE CASCADE,
    attempt         integer NOT NULL,
    dispatcher      text NOT NULL,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz,
    outcome         text NOT NULL,   -- sent | transient | permanent | sender | expired | lease_expired
    error           text,
    latency_ms      double precision
);
CREATE INDEX attempts_message_id ON outbox.attempts (message_id, attempt);
-- BRIN: attempts and events are appended in time order; a range index costs the
-- insert path almost nothing, unlike a B-tree entry per row.
CREATE INDEX attempts_finished_at ON outbox.attempts USING brin (finished_at);

CREATE TABLE outbox.events (
    id          bigserial PRIMARY KEY,            -- durable, increasing: WebSocket resume point
    message_id  uuid NOT NULL REFERENCES outbox.messages (id) ON DELETE CASCADE,
    user_id     text NOT NULL,
    event       text NOT NULL,
    data        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_user_id ON outbox.events (user_id, id);
CREATE INDEX events_message_id ON outbox.events (message_id);
CREATE INDEX events_created_at ON outbox.events USING brin (created_at);

-- Wake the dispatchers once per inserting statement, never once per row.
CREATE FUNCTION outbox.notify_new() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_new', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER messages_notify_new
    AFTER INSERT ON outbox.messages
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.notify_new();
