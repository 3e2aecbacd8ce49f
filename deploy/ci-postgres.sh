#!/usr/bin/env bash
# Start the machine's PostgreSQL 15 cluster and create the test role and database (idempotent).
set -euo pipefail
ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | awk '{print $4}' | grep -q online; then
  pg_ctlcluster "$ver" main start
fi
for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='fpenode'\"" | grep -q 1 \
  || su postgres -c "psql -qc \"CREATE ROLE fpenode LOGIN PASSWORD 'fpenode' CREATEDB\""
su postgres -c "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname='fpenode_test'\"" | grep -q 1 \
  || su postgres -c "psql -qc \"CREATE DATABASE fpenode_test OWNER fpenode\""
