-- The role `outbox serve` and `outbox dispatch` connect as: it reads and writes outbox's
-- rows and runs its functions, and owns nothing, so it can neither change the schema nor
-- drop what it reads. Migrations run as the owner, the role that runs this file (once,
-- before the first `outbox migrate`); the default privileges below cover every table and
-- sequence the owner's migrations create later.
--
--   psql -v app_role=outbox_app -v app_password=… -f deploy/runtime-role.sql
\set ON_ERROR_STOP on
CREATE ROLE :"app_role" LOGIN PASSWORD :'app_password';
CREATE SCHEMA IF NOT EXISTS outbox;
GRANT USAGE ON SCHEMA outbox TO :"app_role";
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA outbox TO :"app_role";
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA outbox TO :"app_role";
ALTER DEFAULT PRIVILEGES IN SCHEMA outbox
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app_role";
ALTER DEFAULT PRIVILEGES IN SCHEMA outbox
    GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO :"app_role";
