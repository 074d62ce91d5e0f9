#!/usr/bin/env bash
# Local MySQL-protocol shard servers without Docker: one MariaDB (or MySQL)
# server process per shard, each with its own data directory and port,
# started from the installed server binaries.
#
#   scripts/shards.sh up [N]     start N shard servers (default 4), create the
#                                shard databases and the app user, print URLs
#   scripts/shards.sh down       stop exactly the servers this script started
#   scripts/shards.sh status     say which are running
#   scripts/shards.sh urls [N]   print the shard URLs, comma separated
#
# Settings (environment):
#   SHARDPAY_SHARDS_DIR        where the data directories live
#                              (default: /tmp/shardpay-shards-<uid>)
#   SHARDPAY_SHARDS_BASE_PORT  port of shard 0; shard i listens on base+i
#                              (default 3316, clear of a server on 3306)
#   SHARDPAY_SHARDS_BUFFER_POOL  InnoDB buffer pool per server (default 128M)
#
# Commits are durable (innodb_flush_log_at_trx_commit=1). The app user is
# shardpay/shardpay on 127.0.0.1; the databases are shardpay_0 .. shardpay_N-1.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

DIR="${SHARDPAY_SHARDS_DIR:-/tmp/shardpay-shards-$(id -u)}"
BASE_PORT="${SHARDPAY_SHARDS_BASE_PORT:-3316}"
BUFFER_POOL="${SHARDPAY_SHARDS_BUFFER_POOL:-128M}"
APP_USER=shardpay
APP_PASSWORD=shardpay
# How long a server may take to accept connections after launch.
START_TIMEOUT_S=60

die() { echo "shards: $*" >&2; exit 1; }

find_bin() {
    for name in "$@"; do
        for dir in /usr/sbin /usr/bin /usr/local/sbin /usr/local/bin /usr/local/mysql/bin; do
            if [ -x "$dir/$name" ]; then echo "$dir/$name"; return 0; fi
        done
        if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
    done
    return 1
}

server_bin() {
    find_bin mariadbd mysqld ||
        die "no MariaDB/MySQL server binary found; install one (Debian: apt-get install -y mariadb-server)"
}
install_db_bin() { find_bin mariadb-install-db mysql_install_db || die "mariadb-install-db not found"; }
client_bin() { find_bin mariadb mysql || die "no mariadb/mysql client found"; }
admin_bin() { find_bin mariadb-admin mysqladmin || die "no mariadb-admin/mysqladmin found"; }

# The server refuses to run as root: run it as the mysql user then.
run_as() {
    if [ "$(id -u)" = 0 ]; then echo "--user=mysql"; fi
}

shard_dir() { echo "$DIR/shard-$1"; }
shard_port() { echo $((BASE_PORT + $1)); }
shard_url() { echo "mysql://$APP_USER:$APP_PASSWORD@127.0.0.1:$(shard_port "$1")/shardpay_$1"; }

pid_of() {
    local pidfile
    pidfile="$(shard_dir "$1")/server.pid"
    [ -f "$pidfile" ] || return 1
    local pid
    pid="$(cat "$pidfile")"
    alive "$pid" || return 1
    echo "$pid"
}

write_config() {
    local i=$1 d
    d="$(shard_dir "$i")"
    cat >"$d/my.cnf" <<EOF
[mysqld]
datadir=$d/data
socket=$d/server.sock
pid-file=$d/server.pid
log-error=$d/error.log
port=$(shard_port "$i")
bind-address=127.0.0.1
skip-name-resolve
innodb_buffer_pool_size=$BUFFER_POOL
innodb_log_file_size=64M
innodb_flush_log_at_trx_commit=1
sync_binlog=0
max_connections=300
# A port briefly held by a closing connection is retried, not fatal.
port-open-timeout=10
character-set-server=utf8mb4
collation-server=utf8mb4_bin
EOF
}

up_one() {
    local i=$1 d port
    d="$(shard_dir "$i")"
    port="$(shard_port "$i")"
    if pid_of "$i" >/dev/null; then
        echo "shard $i already running (pid $(pid_of "$i"), port $port)"
        return 0
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port is taken by another process; set SHARDPAY_SHARDS_BASE_PORT to a free range"
    fi
    mkdir -p "$d"
    write_config "$i"
    local fresh=0
    if [ ! -d "$d/data/mysql" ]; then
        fresh=1
        mkdir -p "$d/data"
        [ "$(id -u)" = 0 ] && chown -R mysql:mysql "$d"
        # Tried twice: a first attempt has been seen failing (rarely) while
        # another data directory was being initialised at the same moment.
        local attempt
        for attempt in 1 2; do
            if "$(install_db_bin)" --defaults-file="$d/my.cnf" $(run_as) \
                --auth-root-authentication-method=socket --skip-test-db >"$d/install.log" 2>&1; then
                break
            fi
            if [ "$attempt" = 2 ]; then
                tail -15 "$d/install.log" >&2
                die "shard $i: initialising $d/data failed; see $d/install.log"
            fi
            echo "shard $i: initialising $d/data failed; trying once more" >&2
            cp "$d/install.log" "$d/install-1.log" 2>/dev/null || true
            rm -rf "$d/data"
            mkdir -p "$d/data"
            [ "$(id -u)" = 0 ] && chown -R mysql:mysql "$d"
            sleep 1
        done
    fi
    [ "$(id -u)" = 0 ] && chown -R mysql:mysql "$d"
    # --defaults-file must come first.
    nohup "$(server_bin)" --defaults-file="$d/my.cnf" $(run_as) >>"$d/server.out" 2>&1 &
    local launched=$! waited=0
    until "$(admin_bin)" --no-defaults --socket="$d/server.sock" -uroot ping >/dev/null 2>&1; do
        sleep 0.1
        if ! alive "$launched"; then
            tail -5 "$d/error.log" >&2 || true
            die "shard $i exited during start-up; see $d/error.log"
        fi
        waited=$((waited + 1))
        if [ $waited -ge $((START_TIMEOUT_S * 10)) ]; then
            tail -20 "$d/error.log" >&2 || true
            die "shard $i did not accept connections within ${START_TIMEOUT_S}s; see $d/error.log"
        fi
    done
    "$(client_bin)" --no-defaults --socket="$d/server.sock" -uroot <<EOF
CREATE DATABASE IF NOT EXISTS shardpay_$i CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
CREATE USER IF NOT EXISTS '$APP_USER'@'127.0.0.1' IDENTIFIED BY '$APP_PASSWORD';
GRANT ALL PRIVILEGES ON *.* TO '$APP_USER'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
    if [ $fresh = 1 ]; then
        echo "shard $i: initialised and started (pid $(pid_of "$i"), port $port)"
    else
        echo "shard $i: started (pid $(pid_of "$i"), port $port)"
    fi
}

down_one() {
    local i=$1 pid
    pid="$(pid_of "$i")" || return 0
    kill "$pid"
    for _ in $(seq 1 300); do
        alive "$pid" || { echo "shard $i: stopped (pid $pid)"; return 0; }
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    echo "shard $i: killed after 30 s (pid $pid)"
}

known_shards() {
    [ -d "$DIR" ] || return 0
    for d in "$DIR"/shard-*; do
        [ -d "$d" ] && basename "$d" | sed 's/shard-//'
    done | sort -n
}

urls() {
    local n=$1 out=""
    for i in $(seq 0 $((n - 1))); do
        out="$out${out:+,}$(shard_url "$i")"
    done
    echo "$out"
}

command="${1:-}"
case "$command" in
up)
    n="${2:-4}"
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 64 ] || die "shard count must be 1 to 64"
    server_bin >/dev/null
    for i in $(seq 0 $((n - 1))); do up_one "$i"; done
    echo "shard URLs (SHARDPAY_MYSQL_URLS):"
    urls "$n"
    ;;
down)
    for i in $(known_shards); do down_one "$i"; done
    ;;
status)
    any=0
    for i in $(known_shards); do
        any=1
        if pid="$(pid_of "$i")"; then
            echo "shard $i: running (pid $pid, port $(shard_port "$i")) $(shard_url "$i")"
        else
            echo "shard $i: stopped ($(shard_dir "$i"))"
        fi
    done
    [ $any = 1 ] || echo "no shard servers under $DIR"
    ;;
urls)
    urls "${2:-4}"
    ;;
*)
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
