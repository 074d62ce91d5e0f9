#!/usr/bin/env bash
# A local Redis for the auth stores and their tests, without Docker: one
# redis-server process on its own port, keeping nothing on disk.
#
#   scripts/redis.sh up        start it, wait until it answers, print its URL
#   scripts/redis.sh down      stop exactly the server this script started
#   scripts/redis.sh status    say whether it is running
#
# Settings (environment):
#   SHARDPAY_REDIS_DIR    pid file and log (default /tmp/shardpay-redis-<uid>)
#   SHARDPAY_REDIS_PORT   port on 127.0.0.1 (default 6479, clear of a Redis
#                         on the standard 6379)
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

DIR="${SHARDPAY_REDIS_DIR:-/tmp/shardpay-redis-$(id -u)}"
PORT="${SHARDPAY_REDIS_PORT:-6479}"

die() { echo "redis: $*" >&2; exit 1; }

server_bin() {
    for candidate in redis-server /usr/bin/redis-server /usr/local/bin/redis-server; do
        if command -v "$candidate" >/dev/null 2>&1; then command -v "$candidate"; return 0; fi
    done
    die "no redis-server found; install one (Debian: apt-get install -y redis-server)"
}

pid() {
    [ -f "$DIR/redis.pid" ] || return 1
    local p
    p="$(cat "$DIR/redis.pid")"
    alive "$p" || return 1
    echo "$p"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

up() {
    local bin p
    bin="$(server_bin)"
    mkdir -p "$DIR"
    if p="$(pid)"; then
        echo "redis: already running (pid $p)" >&2
    else
        port_open && die "port $PORT is taken by another process; set SHARDPAY_REDIS_PORT to a free port"
        "$bin" --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no \
            --daemonize yes --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log" --dir "$DIR"
        for _ in $(seq 100); do port_open && break; sleep 0.1; done
        port_open || { tail -20 "$DIR/redis.log" >&2; die "redis-server did not listen on $PORT"; }
        echo "redis: up on 127.0.0.1:$PORT (pid $(cat "$DIR/redis.pid"))" >&2
    fi
    echo "redis://127.0.0.1:$PORT"
}

down() {
    local p
    if p="$(pid)"; then
        kill "$p" 2>/dev/null || true
        for _ in $(seq 50); do alive "$p" || break; sleep 0.1; done
        alive "$p" && kill -9 "$p" 2>/dev/null || true
        echo "redis: stopped" >&2
    fi
    rm -f "$DIR/redis.pid"
}

case "${1:-}" in
up) up ;;
down) down ;;
status)
    if p="$(pid)"; then echo "redis running (pid $p) on 127.0.0.1:$PORT"; else echo "redis not running"; exit 1; fi
    ;;
*)
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
