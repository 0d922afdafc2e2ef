#!/usr/bin/env bash
# Headless Chromium and its WebDriver for the browser tests (tests/browser/): Debian's `chromium` and
# `chromium-driver`, plus fonts-liberation so canvas labels render (the other recommends are desktop bits).
# Idempotent and quiet: does nothing when both commands exist. Needs root (or sudo) and apt; Playwright's
# own browser download is not used (it cannot reach its CDN here).
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_browser: apt-get not found; install Chromium and chromedriver yourself" \
         "(the browser tests skip without them unless PALIGEMMA_REQUIRE_BROWSER is set)" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-liberation >/dev/null
command -v chromium >/dev/null && command -v chromedriver >/dev/null
echo "setup_browser: installed $(chromium --version 2>/dev/null)"
