#!/bin/sh
# The database roles of docs/audit.md's "Database roles", made once by the postgres image (as its superuser,
# from /docker-entrypoint-initdb.d) when its volume is new: qbgw_owner owns the database and migrates it, and is
# not a superuser; workers connect as qbgw_app, which `qbgw db upgrade --app-role qbgw_app` (the migrate
# service, as qbgw_owner) grants exactly its share.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-$POSTGRES_USER}" \
     -v owner="${DB_OWNER:-qbgw_owner}" -v app="${DB_APP:-qbgw_app}" -v database="${DB_NAME:-qbgw}" \
     -v owner_password="$DB_OWNER_PASSWORD" -v app_password="$DB_APP_PASSWORD" <<'SQL'
CREATE ROLE :"owner" LOGIN PASSWORD :'owner_password';
CREATE ROLE :"app" LOGIN PASSWORD :'app_password';
CREATE DATABASE :"database" OWNER :"owner";
SQL
