#!/usr/bin/env bash
# A second loopback address for the team tests (tests/test_team.py), standing in for another machine:
# 127.0.0.2/32 on `lo`. Linux already routes all of 127.0.0.0/8 to `lo`, but picks 127.0.0.1 as the SOURCE of a
# connection to 127.0.0.2; with the /32 address the source is 127.0.0.2 too, so PostgreSQL's client rules see a
# client that is not 127.0.0.1. Needs root (CAP_NET_ADMIN) and iproute2 (apt-get installs it when missing).
#
#   tests/services/loopback.sh [add|del]      S2R_TEST_SECOND_LOOPBACK  the address [127.0.0.2]
#
# Idempotent; prints nothing but errors.
set -euo pipefail
ADDR="${S2R_TEST_SECOND_LOOPBACK:-127.0.0.2}"

die() {
    echo "loopback.sh: error: $*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || die "adding $ADDR/32 to lo needs root"
if ! command -v ip >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "iproute2 (ip) is missing and apt-get is not available"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends iproute2 >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends iproute2 >/dev/null; } ||
        die "apt-get install iproute2 failed"
fi

present() { ip -4 -o addr show dev lo | grep -q " inet $ADDR/32 "; }

case "${1:-add}" in
    add) present || ip addr add "$ADDR/32" dev lo || die "ip addr add $ADDR/32 dev lo failed" ;;
    del) if present; then ip addr del "$ADDR/32" dev lo; fi ;;
    *) die "usage: $0 [add|del]" ;;
esac
