#!/usr/bin/env bash
# Debian's Chromium and its WebDriver, for the browser tests (tests/label/test_browser.py); run by
# `scripts/install.sh --dev`. Idempotent: does nothing when both are on PATH. Installs the packages with apt-get as
# root or through passwordless sudo; anywhere else it prints the command to run and exits 0 (the browser tests then
# skip, saying how to install them, except under CI, where they fail).
set -euo pipefail

PACKAGES=(chromium chromium-driver)
HOW="apt-get install ${PACKAGES[*]} (as root), or your system's Chromium and chromedriver packages"

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  AS_ROOT=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  AS_ROOT="sudo -n"
else
  echo "browser tests: Chromium is missing and installing it needs root: $HOW" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "browser tests: Chromium is missing and there is no apt-get here: $HOW" >&2
  exit 0
fi

echo "installing Debian's ${PACKAGES[*]} for the browser tests"
APT="$AS_ROOT env DEBIAN_FRONTEND=noninteractive apt-get -qq"  # through env: sudo drops the caller's environment
if ! { $APT update && $APT install -y --no-install-recommends "${PACKAGES[@]}"; } >/dev/null; then
  echo "apt-get could not install ${PACKAGES[*]} (its errors are above); fix that, then run: $HOW" >&2
  exit 1
fi
