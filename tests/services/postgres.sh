#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests (Optuna RDB storage shared by several workers).
#
#   tests/services/postgres.sh          install if needed, create + start the cluster, print its URL
#   tests/services/postgres.sh stop     stop the cluster (its files stay: the next start is fast)
#
# Idempotent: when the cluster is already running it only makes sure the role/database exist and prints
# the URL. PostgreSQL comes from Debian packages (apt-get install postgresql) when no pg_ctl/initdb is found.
# The server listens on 127.0.0.1 only (TCP) plus a unix socket inside the cluster folder; it is tuned for
# speed, not durability (fsync off). Output: nothing but errors and, last on stdout, the URL.
#
#   S2R_PG_DIR   cluster folder [/tmp/s2r-pg]     S2R_PG_PORT  TCP port [54329]
set -euo pipefail

PG_DIR="${S2R_PG_DIR:-/tmp/s2r-pg}"
PG_PORT="${S2R_PG_PORT:-54329}"
PG_HOST=127.0.0.1
DATA="$PG_DIR/data"
LOG="$PG_DIR/server.log"
SETUP_LOG="$PG_DIR/setup.log"
ROLE=s2r
PASSWORD=s2r
DB=s2r_optuna
URL="postgresql+psycopg2://$ROLE:$PASSWORD@$PG_HOST:$PG_PORT/$DB"

die() {
    echo "postgres.sh: error: $*" >&2
    exit 1
}

show_log() {  # last lines of a log file, to stderr
    [ -f "$1" ] && { echo "--- last lines of $1:" >&2; tail -n 25 "$1" >&2; }
    return 0
}

find_bindir() {  # newest /usr/lib/postgresql/*/bin, else wherever pg_ctl is on PATH
    local d
    for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -t/ -k5 -V -r); do
        if [ -x "$d/pg_ctl" ] && [ -x "$d/initdb" ] && [ -x "$d/postgres" ]; then
            echo "$d"
            return 0
        fi
    done
    if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return 0
    fi
    return 1
}

install_postgres() {
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if ! { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; then
            die "PostgreSQL is not installed and installing it needs root (apt-get install postgresql)"
        fi
        sudo=(sudo -n)
    fi
    command -v apt-get >/dev/null 2>&1 || die "PostgreSQL is not installed and apt-get is not available"
    # Debian's packages would also create (and, where services may start, run) a 'main' cluster on port
    # 5432; this throwaway setup does not want it. Only set when postgresql-common is not installed yet.
    if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
        "${sudo[@]}" mkdir -p /etc/postgresql-common/createcluster.d
        echo "create_main_cluster = false  # s2r tests/services/postgres.sh" |
            "${sudo[@]}" tee /etc/postgresql-common/createcluster.d/s2r-no-main-cluster.conf >/dev/null
    fi
    local log
    log=$(mktemp)
    export DEBIAN_FRONTEND=noninteractive
    if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends postgresql >"$log" 2>&1; then
        # stale or missing package lists: refresh once and retry
        if ! { "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q --no-install-recommends \
            postgresql; } >>"$log" 2>&1; then
            show_log "$log"
            rm -f "$log"
            die "apt-get install postgresql failed"
        fi
    fi
    rm -f "$log"
}

# --- who runs the server: root may not, so as root it is the 'postgres' user --------------------------
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || NEED_INSTALL=1
    as_owner() { runuser -u postgres -- "$@"; }
    OWNER=postgres
else
    as_owner() { "$@"; }
    OWNER=$(id -un)
fi

BIN=$(find_bindir) || BIN=""

stop_cluster() {
    [ -n "$BIN" ] && [ -f "$DATA/postmaster.pid" ] || return 0
    if as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
        as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null 2>>"$SETUP_LOG" ||
            { show_log "$SETUP_LOG"; die "could not stop the cluster in $DATA"; }
    fi
}

psql_admin() {  # run SQL as the superuser over the unix socket; prints tuples only
    as_owner "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_DIR" -p "$PG_PORT" -U postgres -d "${2:-postgres}" \
        -tAc "$1"
}

case "${1:-start}" in
    stop)
        stop_cluster
        exit 0
        ;;
    start) ;;
    *)
        echo "usage: $0 [start|stop]" >&2
        exit 2
        ;;
esac

if [ -z "$BIN" ] || [ "${NEED_INSTALL:-0}" = 1 ]; then
    install_postgres
    BIN=$(find_bindir) || die "PostgreSQL was installed but no pg_ctl/initdb was found under /usr/lib/postgresql"
    id "$OWNER" >/dev/null 2>&1 || die "user '$OWNER' is missing after installing PostgreSQL"
fi

# --- the cluster folder, owned by the server's user; one setup at a time ----------------------------------
# (as root, every parent of S2R_PG_DIR must be traversable by 'postgres': /tmp/... is, /root/... is not)
if [ ! -d "$PG_DIR" ]; then
    mkdir -p "$PG_DIR"
    chmod 700 "$PG_DIR"
fi
if [ "$(id -u)" -eq 0 ]; then
    chown "$OWNER": "$PG_DIR"
fi
as_owner test -w "$PG_DIR" -a -x "$PG_DIR" ||
    die "$OWNER cannot write $PG_DIR (as root, use a folder every user can reach, e.g. under /tmp)"
exec 9>>"$PG_DIR/.lock"
if command -v flock >/dev/null 2>&1; then
    flock -w 120 9 || die "another postgres.sh holds $PG_DIR/.lock"
fi

if [ ! -f "$DATA/PG_VERSION" ]; then
    rm -rf "$DATA"
    : >"$SETUP_LOG"
    # superuser 'postgres': trust over the unix socket only; TCP clients need a password (scram-sha-256)
    if ! as_owner "$BIN/initdb" -D "$DATA" -U postgres -E UTF8 --locale=C --no-sync \
        --auth-local=trust --auth-host=scram-sha-256 >>"$SETUP_LOG" 2>&1; then
        show_log "$SETUP_LOG"
        die "initdb failed in $DATA"
    fi
    cat >>"$DATA/postgresql.conf" <<EOF

# --- s2r tests/services/postgres.sh: throwaway test server ---
listen_addresses = '$PG_HOST'
port = $PG_PORT
unix_socket_directories = '$PG_DIR'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 100
logging_collector = off
EOF
else
    major=$("$BIN/postgres" --version | sed -E 's/.* ([0-9]+)[.].*/\1/')
    [ "$(cat "$DATA/PG_VERSION")" = "$major" ] ||
        die "$DATA was made by PostgreSQL $(cat "$DATA/PG_VERSION"), this is $major: remove $PG_DIR"
fi

# --- start (unless running) and wait until it accepts connections -----------------------------------------
if ! as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    # an existing cluster may have been made for another S2R_PG_PORT
    as_owner sed -i -E "s|^port = [0-9]+$|port = $PG_PORT|" "$DATA/postgresql.conf"
    # 9>&-: the server must not inherit the lock
    if ! as_owner "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 start >/dev/null 2>>"$SETUP_LOG" 9>&-; then
        show_log "$LOG"
        die "the server did not start (port $PG_PORT busy? another server in $PG_DIR?)"
    fi
fi
ready=0
for _ in $(seq 1 120); do
    if "$BIN/pg_isready" -q -h "$PG_HOST" -p "$PG_PORT" -d postgres 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.5
done
[ "$ready" = 1 ] || { show_log "$LOG"; die "the server does not accept connections on $PG_HOST:$PG_PORT"; }

# --- role and database ------------------------------------------------------------------------------------
if [ "$(psql_admin "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != 1 ]; then
    psql_admin "CREATE ROLE $ROLE LOGIN PASSWORD '$PASSWORD'" || die "could not create role $ROLE"
fi
if [ "$(psql_admin "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
    psql_admin "CREATE DATABASE $DB OWNER $ROLE" || die "could not create database $DB"
fi

echo "$URL"
