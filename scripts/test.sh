#!/usr/bin/env bash
# Every test of the project, in one command: starts the servers the tests
# need on ports of its own (a MariaDB shard server, a Kafka-protocol broker,
# a Redis; scripts/shards.sh, kafka.sh, redis.sh), runs every test suite
# with the environment that makes the server-backed tests run rather than
# skip, then the smoke scenario in-process, on Kafka, on Redis and through
# the six services as six processes (scripts/stack.sh), and stops every
# server it started, whatever happened.
#
#   scripts/test.sh             all of it
#   scripts/test.sh --install   first install missing server packages
#                               (mariadb-server, redis-server, curl,
#                               chromium for the live view's browser test) with
#                               apt-get; CI uses this on a fresh machine
#
# `cargo test --release --workspace` alone also works: the tests that need
# a server it was not given say so ("MySQL test skipped: set ...") and
# pass without it.
#
# Settings (environment): SHARDPAY_TEST_TMP (default $TMPDIR or /tmp) for
# the servers' files; the ports default clear of the standard ones and of
# the scripts' own defaults: SHARDPAY_CI_MYSQL_PORT (3416),
# SHARDPAY_CI_KAFKA_PORT (9292), SHARDPAY_CI_REDIS_PORT (6579),
# SHARDPAY_CI_STACK_PORT (18001, the six services' first port).
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "$@" >/dev/null || {
        apt-get --fix-broken install -y -qq >/dev/null
        apt-get install -y -qq "$@" >/dev/null
    }
}

has() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]
}

if [ "${1:-}" = "--install" ]; then
    if ! has mariadbd && ! has mysqld; then
        echo "== installing mariadb-server"
        apt_install mariadb-server
    fi
    if ! has redis-server; then
        echo "== installing redis-server"
        apt_install redis-server
    fi
    if ! has curl; then
        echo "== installing curl"
        apt_install curl
    fi
    if ! has chromium; then
        echo "== installing chromium (the live view's browser test)"
        apt_install chromium
    fi
fi
for need in "mariadbd mysqld:mariadb-server" "redis-server:redis-server" "python3:python3" "chromium:chromium"; do
    bins="${need%%:*}" package="${need##*:}" found=
    for bin in $bins; do has "$bin" && found=1; done
    if [ -z "$found" ]; then
        echo "test.sh: no ${bins// / or } found; install $package (Debian: apt-get install -y $package), or run scripts/test.sh --install as root" >&2
        exit 1
    fi
done

TMP="${SHARDPAY_TEST_TMP:-${TMPDIR:-/tmp}}"
export SHARDPAY_SHARDS_DIR="$TMP/shardpay-test-shards-$$"
export SHARDPAY_SHARDS_BASE_PORT="${SHARDPAY_CI_MYSQL_PORT:-3416}"
export SHARDPAY_KAFKA_DIR="$TMP/shardpay-test-kafka-$$"
export SHARDPAY_KAFKA_PORT="${SHARDPAY_CI_KAFKA_PORT:-9292}"
export SHARDPAY_REDIS_DIR="$TMP/shardpay-test-redis-$$"
export SHARDPAY_REDIS_PORT="${SHARDPAY_CI_REDIS_PORT:-6579}"
STACK_DIR="$TMP/shardpay-test-stack-$$"
stop_all() {
    SHARDPAY_STACK_DIR="$STACK_DIR" scripts/stack.sh down >/dev/null 2>&1 || true
    scripts/shards.sh down || true
    scripts/kafka.sh down || true
    scripts/redis.sh down || true
    rm -rf "$SHARDPAY_SHARDS_DIR" "$SHARDPAY_KAFKA_DIR" "$SHARDPAY_REDIS_DIR" "$STACK_DIR"
}
trap stop_all EXIT

echo "== MariaDB shard server for the MySQL tests"
scripts/shards.sh up 1
export SHARDPAY_TEST_MYSQL_URL="mysql://shardpay:shardpay@127.0.0.1:$SHARDPAY_SHARDS_BASE_PORT"
# Given a server, the MySQL, Kafka and Redis tests must fail if they cannot
# use it, never skip.
export SHARDPAY_REQUIRE_MYSQL=1

echo "== Kafka-protocol broker for the Kafka bus tests"
SHARDPAY_TEST_KAFKA_BOOTSTRAP="$(scripts/kafka.sh up)"
export SHARDPAY_TEST_KAFKA_BOOTSTRAP
export SHARDPAY_REQUIRE_KAFKA=1

echo "== Redis for the auth stores' tests"
SHARDPAY_TEST_REDIS_URL="$(scripts/redis.sh up)"
export SHARDPAY_TEST_REDIS_URL
export SHARDPAY_REQUIRE_REDIS=1

echo "== docker-compose.yml, checked by Docker Compose itself (no container engine needed)"
scripts/compose.sh check
# The six-service test takes its commands and environment from the file.
export SHARDPAY_REQUIRE_COMPOSE=1

# The live view's browser test opens its page in headless Chromium.
export SHARDPAY_REQUIRE_CHROMIUM=1

echo "== every test suite"
cargo test --release --workspace

echo "== smoke scenario (exits non-zero if a threshold or the audit fails)"
# The binary the tests just built: same features, no rebuild.
./target/release/shardpay run scenarios/smoke.toml --reports target/ci-reports

echo "== smoke scenario with the events on the Kafka broker"
./target/release/shardpay run scenarios/smoke.toml --kafka "$SHARDPAY_TEST_KAFKA_BOOTSTRAP" --reports target/ci-reports

echo "== smoke scenario with sessions, rate limits and idempotency locks on Redis"
./target/release/shardpay run scenarios/smoke.toml --redis "$SHARDPAY_TEST_REDIS_URL" --reports target/ci-reports

echo "== the six services as six processes on their own servers (scripts/stack.sh), the smoke scenario through them"
(
    export SHARDPAY_STACK_DIR="$STACK_DIR"
    export SHARDPAY_STACK_BASE_PORT="${SHARDPAY_CI_STACK_PORT:-18001}"
    export SHARDPAY_SHARDS_DIR="$STACK_DIR/shards" SHARDPAY_SHARDS_BASE_PORT=$((SHARDPAY_SHARDS_BASE_PORT + 10))
    export SHARDPAY_KAFKA_DIR="$STACK_DIR/kafka" SHARDPAY_KAFKA_PORT=$((SHARDPAY_KAFKA_PORT + 100))
    export SHARDPAY_REDIS_DIR="$STACK_DIR/redis" SHARDPAY_REDIS_PORT=$((SHARDPAY_REDIS_PORT + 100))
    trap 'scripts/stack.sh down || true' EXIT
    scripts/stack.sh up
    at() { echo "http://127.0.0.1:$((SHARDPAY_STACK_BASE_PORT + $1))"; }
    SHARDPAY_ADMIN_PASSWORD="$(cat "$SHARDPAY_STACK_DIR/admin-password")" \
        ./target/release/shardpay run scenarios/smoke.toml --target "$(at 5)" \
        --service "auth=$(at 0)" --service "notification=$(at 3)" --service "analytics=$(at 4)" \
        --reports target/ci-reports
)

echo "== every test passed"
