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
#
# Settings (environment):
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

die() { echo "stack: $*" >&2; exit 1; }

port_of() {
    local i=0 s
    for s in $SERVICES; do
        if [ "$s" = "$1" ]; then echo $((BASE + i)); return; fi
        i=$((i + 1))
    done
}
url_of() { echo "http://127.0.0.1:$(port_of "$1")"; }

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
    for s in $SERVICES; do
        if pid_of "$s" >/dev/null; then
            echo "$s: already running (pid $(pid_of "$s"))" >&2
            continue
        fi
        # A local stack: the simulator's webhook receiver listens on
        # loopback, so webhooks may go there (never the default).
        # shellcheck disable=SC2086
        SHARDPAY_JWT_SECRET="$jwt" SHARDPAY_ADMIN_PASSWORD="$admin" \
            SHARDPAY_WEBHOOKS_TO_PRIVATE_NETWORKS=true \
            nohup "$BIN" --log-format json serve "$s" \
            --port "$(port_of "$s")" \
            --data-dir "$DIR/data" \
            --mysql-urls "$shards" \
            --kafka "$kafka" \
            --redis "$redis" \
            --fraud-features redis \
            --auth-url "$(url_of auth)" \
            --ledger-url "$(url_of ledger)" \
            --fraud-url "$(url_of fraud)" \
            --notification-url "$(url_of notification)" \
            ${SHARDPAY_STACK_SERVE_ARGS---login-limit-per-user 0 --login-limit-per-address 0} \
            >"$DIR/$s.out" 2>"$DIR/$s.log" &
        echo $! >"$DIR/$s.pid"
    done
    for s in $SERVICES; do
        ready "$s"
        echo "$s: ready on $(url_of "$s") (pid $(cat "$DIR/$s.pid"), log $DIR/$s.log)" >&2
    done
    cat >&2 <<EOF

The six services are up. Drive them with:
  SHARDPAY_ADMIN_PASSWORD=\$(cat $DIR/admin-password) \\
  $BIN run scenarios/smoke.toml --target $(url_of shard-manager) \\
      --service auth=$(url_of auth) --service notification=$(url_of notification) \\
      --service analytics=$(url_of analytics)
The simulator logs in as admin and registers its users. Dashboard:
$(url_of analytics)/dashboard/analytics  API docs: $(url_of shard-manager)/docs
Stop everything with: scripts/stack.sh down
EOF
}

down() {
    local s p
    for s in $SERVICES; do
        if p="$(pid_of "$s")"; then
            kill -TERM "$p" 2>/dev/null || true
        fi
    done
    for s in $SERVICES; do
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
    for s in $SERVICES; do
        if p="$(pid_of "$s")"; then
            echo "$s: running (pid $p) on $(url_of "$s")"
        else
            echo "$s: stopped"
        fi
    done
    scripts/shards.sh status || true
    scripts/redis.sh status || true
    scripts/kafka.sh status || true
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
*)
    echo "usage: scripts/stack.sh up | down | status" >&2
    exit 2
    ;;
esac
