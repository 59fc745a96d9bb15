#!/usr/bin/env bash
# Install PgBouncer (Debian/Ubuntu package pgbouncer) for the tests that run ductwork behind a
# transaction-pooling pooler (tests/pgbouncer.py starts a private pgbouncer per test session).
# Idempotent: does nothing when the pgbouncer binary is already on PATH or in /usr/sbin. The
# package's own service is never left running: the tests start their own pgbouncer on a free
# port, and a system one would sit on 6432 for nothing. Exit status is non-zero only when an
# install was attempted and failed; without apt-get it prints why and exits 0 (the pooler tests
# then skip with that reason, or fail under CI=true).
set -euo pipefail

found_pgbouncer() {
  command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]
}

if found_pgbouncer; then
  echo "install-pgbouncer: pgbouncer already installed"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-pgbouncer: no apt-get here; install pgbouncer yourself" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
# Keep the package's maintainer scripts from starting its service: a policy-rc.d that says
# "no" (exit 101) for the length of the install, unless the machine already has one.
POLICY=/usr/sbin/policy-rc.d
OURS=""
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 755 "$POLICY"
  OURS=1
fi
cleanup() {
  if [ -n "$OURS" ]; then $SUDO rm -f "$POLICY"; fi
}
trap cleanup EXIT
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq pgbouncer >/dev/null
found_pgbouncer
# Should a service have started all the same (a policy-rc.d that allows it), stop it and keep
# it from starting at boot.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  $SUDO systemctl disable --now pgbouncer >/dev/null 2>&1 || true
else
  $SUDO service pgbouncer stop >/dev/null 2>&1 || true
  $SUDO update-rc.d pgbouncer disable >/dev/null 2>&1 || true
fi
PGB="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"
echo "install-pgbouncer: installed $("$PGB" --version 2>/dev/null | head -n1 || echo pgbouncer)"
