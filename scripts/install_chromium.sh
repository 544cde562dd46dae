#!/usr/bin/env bash
# Install Debian's Chromium for the report rendering test (tests/test_report.py), unless a Chromium is
# already on PATH (idempotent). Uses sudo only when not root.
set -euo pipefail
for browser in chromium chromium-browser google-chrome; do
  if command -v "$browser" >/dev/null 2>&1; then
    echo "$browser: $(command -v "$browser")"
    exit 0
  fi
done
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
$SUDO apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
command -v chromium
