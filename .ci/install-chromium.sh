#!/usr/bin/env bash
# Install headless Chromium and its WebDriver (Debian/Ubuntu packages chromium and
# chromium-driver) for the dashboard's browser tests (tests/test_dashboard.py and
# tests/test_dashboard_actions.py). Idempotent: does nothing when both binaries are
# already on PATH. Exit status is non-zero only when an install was attempted and failed;
# without apt-get it prints why and exits 0 (the browser tests then skip with that reason).
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  echo "install-chromium: chromium and chromedriver already installed"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-chromium: no apt-get here; install chromium and chromedriver yourself" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
command -v chromium >/dev/null && command -v chromedriver >/dev/null
echo "install-chromium: installed $(chromium --version 2>/dev/null || echo chromium)"
