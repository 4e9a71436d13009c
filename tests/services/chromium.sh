#!/usr/bin/env bash
# Headless Chromium + its WebDriver for the browser test of the MLflow UI (tests/test_ui_browser.py).
#
#   tests/services/chromium.sh     install Debian's chromium and chromium-driver if missing, print the two paths
#
# Idempotent: when /usr/bin/chromium and /usr/bin/chromedriver exist nothing is installed. Needs root (or sudo)
# and the Debian package mirror the first time. Output: nothing but errors and, last on stdout, the two paths
# separated by a space (browser, driver).
set -euo pipefail

BROWSER="${S2R_CHROMIUM:-/usr/bin/chromium}"
DRIVER="${S2R_CHROMEDRIVER:-/usr/bin/chromedriver}"
SETUP_LOG="${TMPDIR:-/tmp}/s2r-chromium-setup.log"

die() {
    echo "chromium.sh: error: $*" >&2
    exit 1
}

if [ ! -x "$BROWSER" ] || [ ! -x "$DRIVER" ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "chromium/chromium-driver are missing and this is not root (no sudo)"
        SUDO="sudo -n"
    fi
    command -v apt-get >/dev/null 2>&1 || die "no apt-get: install chromium and chromedriver yourself"
    {
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver
    } >"$SETUP_LOG" 2>&1 || { tail -n 25 "$SETUP_LOG" >&2; die "apt-get install chromium chromium-driver failed"; }
fi
[ -x "$BROWSER" ] || die "$BROWSER is missing after the install"
[ -x "$DRIVER" ] || die "$DRIVER is missing after the install"
echo "$BROWSER $DRIVER"
