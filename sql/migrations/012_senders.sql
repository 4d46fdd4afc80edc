-- Senders: sending identities kept in the database, each with its own provider settings
-- and credentials, beside the sender `default` that the environment defines (which is
-- never stored here). The admin API writes them (outbox/senders_api.py).

CREATE TABLE outbox.senders (
    id          text PRIMARY KEY CHECK (id ~ '^[a-z0-9_-]{1,64}$'),
    provider    text NOT NULL CHECK (provider IN ('cloud', 'http', 'fake')),
    settings    jsonb NOT NULL DEFAULT '{}'::jsonb,   -- the settings that are not secret
    -- One Fernet token (OUTBOX_SECRET_KEY) of the JSON object of the secret settings
    -- (access_token, app_secret, secret); NULL when the sender has none.
    secrets     bytea,
    secret_fields text[] NOT NULL DEFAULT '{}',       -- the names of those set (never values)
    rate_limit  double precision CHECK (rate_limit > 0),  -- messages per second; NULL: unlimited
    users       text[] NOT NULL,                       -- JWT subs allowed to send, or {*}
    paused      jsonb,                                 -- NULL, or {reason, code, since, until, manual}
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Every change is announced in its own transaction (delivered on commit), so processes
-- that keep the senders in memory can read them again.
CREATE FUNCTION outbox.notify_senders() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_senders', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER senders_notify
    AFTER INSERT OR UPDATE OR DELETE ON outbox.senders
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.notify_senders();

-- A message keeps its sender's id as plain text, no foreign key: a sender whose
-- messages are all finished can be deleted, their history kept. A constant default adds
-- the column without rewriting the table.
ALTER TABLE outbox.messages ADD COLUMN sender text NOT NULL DEFAULT 'default';
