#!/usr/bin/env bash
# Install promtool (Debian's prometheus package) for the tests that check /metrics (`promtool check metrics`)
# and the alerting rules (`promtool check rules`). Idempotent: nothing to do when promtool is on PATH. The
# package's own Prometheus service is never left running (a policy-rc.d says no for the install's length).
# Exit status is non-zero only when an install was attempted and failed; without apt-get it says why and exits 0
# (those tests then skip with that reason, or fail under CI=true).
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
  echo "install-promtool: promtool already installed"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-promtool: no apt-get here; install the prometheus package yourself" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
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
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
$SUDO service prometheus stop >/dev/null 2>&1 || true
command -v promtool >/dev/null
echo "install-promtool: installed $(promtool --version 2>&1 | head -n1)"
