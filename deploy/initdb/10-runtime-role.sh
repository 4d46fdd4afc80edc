#!/bin/sh
# The postgres image runs this once, when its data volume is new (docker-entrypoint-initdb.d):
# the runtime role of serve and dispatch (deploy/runtime-role.sql), as the owner.
set -eu
psql --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v app_role=outbox_app -v app_password="$POSTGRES_APP_PASSWORD" \
    -f /outbox/runtime-role.sql
