#!/usr/bin/env bash
# The reference system as six processes on local servers, without Docker:
# the docker-compose.yml deployment on one machine.
#
#   scripts/stack.sh up       start 4 MariaDB/MySQL shards, Redis and the
#                             Kafka-protocol broker (scripts/shards.sh,
#                             redis.sh, kafka.sh), then auth, ledger, fraud,
#                             notification, analytics and shard-manager, each
#                             `shardpay serve <service>` on its port; wait
#                             until each is ready; print how to drive it
#   scripts/stack.sh down     stop the six services (SIGTERM, by pid), then
#                             the servers this script started
#   scripts/stack.sh status   say what is running
#   scripts/stack.sh kill SERVICE [REPLICA]
#                             SIGKILL one replica of a service (default
#                             replica 1), as a crash would; the others
#                             keep serving
#
# Settings (environment):
#   SHARDPAY_STACK_REPLICAS   replicas of each stateless service: auth,
#                             fraud, notification, analytics and
#                             shard-manager (default 1, at most 9). The
#                             ledger service (the outbox relay, the
#                             recovery loop) stays one process. Each
#                             analytics replica reads every event in a
#                             consumer group of its own (analytics-R).
#                             Replica r of a service listens on its first
#                             port plus 10 * (r - 1): with the default
#                             ports, auth 8001 and 8011, fraud 8003 and
#                             8013, notification 8004 and 8014, analytics
#                             8005 and 8015, shard-manager 8006 and 8016.
#                             Every service is given each peer as the list
#                             of its replicas' URLs.
#   SHARDPAY_STACK_DIR        pids, logs, the JWT secret and the admin
#                             password (default /tmp/shardpay-stack-<uid>)
#   SHARDPAY_STACK_BASE_PORT  port of auth; ledger, fraud, notification,
#                             analytics and shard-manager follow (default
#                             8001, so shard-manager is on 8006)
#   SHARDPAY_BIN              the shardpay binary (default
#                             target/release/shardpay; build it first with
#                             cargo build --release)
#   SHARDPAY_STACK_SERVE_ARGS more options for every service (default:
#                             login rate limits off, as the simulator logs
#                             in up to 256 users from one address; set it
#                             to "" to keep the limits)
# The shard, Redis and broker scripts' own settings apply too
# (SHARDPAY_SHARDS_BASE_PORT, SHARDPAY_REDIS_PORT, SHARDPAY_KAFKA_PORT...).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

DIR="${SHARDPAY_STACK_DIR:-/tmp/shardpay-stack-$(id -u)}"
BASE="${SHARDPAY_STACK_BASE_PORT:-8001}"
BIN="${SHARDPAY_BIN:-target/release/shardpay}"
SERVICES="auth ledger fraud notification analytics shard-manager"
REPLICATED="auth fraud notification analytics shard-manager"
REPLICAS="${SHARDPAY_STACK_REPLICAS:-1}"
MAX_REPLICAS=9

die() { echo "stack: $*" >&2; exit 1; }

case "$REPLICAS" in
[1-9]) ;;
*) die "SHARDPAY_STACK_REPLICAS=$REPLICAS: give 1 to $MAX_REPLICAS" ;;
esac

# Replicas of service $1 this stack runs.
replicas_of() {
    case " $REPLICATED " in
    *" $1 "*) echo "$REPLICAS" ;;
    *) echo 1 ;;
    esac
}

# An instance is a service's replica: `notification` is replica 1,
# `notification-2` replica 2. Its pid and logs are named after it.
instance() { if [ "$2" = 1 ]; then echo "$1"; else echo "$1-$2"; fi; }
service_of() { echo "${1%-[0-9]}"; }
replica_of() {
    case "$1" in
    *-[0-9]) echo "${1##*-}" ;;
    *) echo 1 ;;
    esac
}

# The instances of the stack, in start order (every replica of auth, then
# ledger, ...); with `all`, every instance that may have a pid file.
instances() {
    local s r n
    for s in $SERVICES; do
        n="$(replicas_of "$s")"
        [ "${1:-}" = all ] && n=$MAX_REPLICAS
        for r in $(seq "$n"); do instance "$s" "$r"; done
    done
}

port_of() {
    local i=0 s service replica
    service="$(service_of "$1")"
    replica="$(replica_of "$1")"
    for s in $SERVICES; do
        if [ "$s" = "$service" ]; then echo $((BASE + i + 10 * (replica - 1))); return; fi
        i=$((i + 1))
    done
}
url_of() { echo "http://127.0.0.1:$(port_of "$1")"; }

# The URLs of every replica of service $1, separated by commas.
urls_of() {
    local r urls=""
    for r in $(seq "$(replicas_of "$1")"); do
        urls="$urls${urls:+,}$(url_of "$(instance "$1" "$r")")"
    done
    echo "$urls"
}

pid_of() {
    [ -f "$DIR/$1.pid" ] || return 1
    local p
    p="$(cat "$DIR/$1.pid")"
    alive "$p" || return 1
    echo "$p"
}

secret() {
    # Made once per stack directory; never a built-in default.
    [ -s "$DIR/$1" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/$1"
    cat "$DIR/$1"
}

ready() {
    local name="$1" url
    url="$(url_of "$name")/ready"
    for _ in $(seq 300); do
        if curl -fsS -o /dev/null "$url" 2>/dev/null; then return 0; fi
        alive "$(cat "$DIR/$name.pid")" || { tail -20 "$DIR/$name.log" >&2; die "$name exited; its log is $DIR/$name.log"; }
        sleep 0.2
    done
    tail -20 "$DIR/$name.log" >&2
    die "$name is not ready after 60 s: $(curl -sS "$url" 2>&1)"
}

up() {
    [ -x "$BIN" ] || die "no binary at $BIN; run cargo build --release (or set SHARDPAY_BIN)"
    command -v curl >/dev/null || die "curl is needed to wait for the services"
    mkdir -p "$DIR"
    local shards kafka redis
    scripts/shards.sh up 4 >"$DIR/shards.out"
    shards="$(tail -1 "$DIR/shards.out")"
    kafka="$(scripts/kafka.sh up)"
    redis="$(scripts/redis.sh up)"
    local jwt admin
    jwt="$(secret jwt-secret)"
    admin="$(secret admin-password)"
    local s
    for s in $(instances); do
        if pid_of "$s" >/dev/null; then
            echo "$s: already running (pid $(pid_of "$s"))" >&2
            continue
        fi
        # A local stack: the simulator's webhook receiver listens on
        # loopback, so webhooks may go there (never the default).
        # shellcheck disable=SC2086
        SHARDPAY_JWT_SECRET="$jwt" SHARDPAY_ADMIN_PASSWORD="$admin" \
            SHARDPAY_WEBHOOKS_TO_PRIVATE_NETWORKS=true \
            nohup "$BIN" --log-format json serve "$(service_of "$s")" \
            --port "$(port_of "$s")" \
            --data-dir "$DIR/data" \
            --mysql-urls "$shards" \
            --kafka "$kafka" \
            --redis "$redis" \
            --fraud-features redis \
            --auth-url "$(urls_of auth)" \
            --ledger-url "$(urls_of ledger)" \
            --fraud-url "$(urls_of fraud)" \
            --notification-url "$(urls_of notification)" \
            --analytics-group "analytics-$(replica_of "$s")" \
            ${SHARDPAY_STACK_SERVE_ARGS---login-limit-per-user 0 --login-limit-per-address 0} \
            >"$DIR/$s.out" 2>"$DIR/$s.log" &
        echo $! >"$DIR/$s.pid"
    done
    for s in $(instances); do
        ready "$s"
        echo "$s: ready on $(url_of "$s") (pid $(cat "$DIR/$s.pid"), log $DIR/$s.log)" >&2
    done
    cat >&2 <<EOF

The six services are up ($REPLICAS of each of $REPLICATED). Drive them with:
  SHARDPAY_ADMIN_PASSWORD=\$(cat $DIR/admin-password) \\
  $BIN run scenarios/smoke.toml --target $(urls_of shard-manager) \\
      --service auth=$(urls_of auth) --service notification=$(urls_of notification) \\
      --service analytics=$(urls_of analytics)
The simulator logs in as admin and registers its users. Dashboard:
$(url_of analytics)/dashboard/analytics  API docs: $(url_of shard-manager)/docs
Stop everything with: scripts/stack.sh down
EOF
}

down() {
    local s p
    for s in $(instances all); do
        if p="$(pid_of "$s")"; then
            kill -TERM "$p" 2>/dev/null || true
        fi
    done
    for s in $(instances all); do
        if p="$(pid_of "$s")"; then
            for _ in $(seq 150); do alive "$p" || break; sleep 0.2; done
            if alive "$p"; then
                kill -KILL "$p" 2>/dev/null || true
                echo "$s: killed after 30 s (pid $p)" >&2
            else
                echo "$s: stopped (pid $p)" >&2
            fi
        fi
        rm -f "$DIR/$s.pid"
    done
    scripts/kafka.sh down || true
    scripts/redis.sh down || true
    scripts/shards.sh down || true
}

status() {
    local s p
    for s in $(instances all); do
        if p="$(pid_of "$s")"; then
            echo "$s: running (pid $p) on $(url_of "$s")"
        elif [ "$(replica_of "$s")" -le "$(replicas_of "$(service_of "$s")")" ]; then
            echo "$s: stopped"
        fi
    done
    scripts/shards.sh status || true
    scripts/redis.sh status || true
    scripts/kafka.sh status || true
}

# SIGKILL replica $2 (default 1) of service $1: no graceful stop.
kill_replica() {
    local service="${1:-}" replica="${2:-1}" s p
    case " $SERVICES " in
    *" $service "*) ;;
    *) die "kill: name a service: $SERVICES" ;;
    esac
    case "$replica" in
    [1-9]) ;;
    *) die "kill: replica $replica: give 1 to $MAX_REPLICAS" ;;
    esac
    s="$(instance "$service" "$replica")"
    p="$(pid_of "$s")" || die "$s is not running"
    kill -KILL "$p"
    for _ in $(seq 150); do alive "$p" || break; sleep 0.2; done
    rm -f "$DIR/$s.pid"
    echo "$s: killed (pid $p)" >&2
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
kill) kill_replica "${2:-}" "${3:-}" ;;
*)
    echo "usage: scripts/stack.sh up | down | status | kill SERVICE [REPLICA]" >&2
    exit 2
    ;;
esac
