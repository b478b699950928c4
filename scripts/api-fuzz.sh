#!/usr/bin/env bash
# Fuzzes the REST API from the spec it serves: schemathesis (PyPI) against a
# real `opspawn serve` (SQLite, the example plugins), once with
# authentication off and once with a token configured. Fails on any server
# error and on any answer whose status, content type, headers or body the
# spec does not allow.
#
#   scripts/api-fuzz.sh
#
# OPSPAWN_FUZZ_SECONDS (default 75) bounds each of the two runs.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$repo_root"

seconds="${OPSPAWN_FUZZ_SECONDS:-75}"
checks=not_a_server_error,status_code_conformance,content_type_conformance
checks+=,response_headers_conformance,response_schema_conformance

ensure_wasm_target
ensure_api_fuzzer
build_plugins
echo "==> building the server"
# The same selection as scripts/test.sh builds, so that the binary it
# already built is reused rather than rebuilt with other features.
cargo test --profile ci --workspace --no-run
binary="$CARGO_TARGET_DIR/ci/opspawn"

work="$(mktemp -d)"
server_pid=""
stop_server() {
    if [[ -n "$server_pid" ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=""
    fi
}
trap 'stop_server; rm -rf "$work"' EXIT
install_plugins "$work/plugins"

# start_server NAME [CONFIG_FILE]: serves a fresh data folder on a free
# port and sets $server_url once the plugins have loaded.
start_server() {
    local data="$work/$1" config="${2:-}"
    mkdir -p "$data"
    local env=(OPSPAWN_ADDR=127.0.0.1:0 OPSPAWN_DATA_DIR="$data"
        OPSPAWN_PLUGIN_DIR="$work/plugins" OPSPAWN_LOG=warn,opspawn=info)
    [[ -n "$config" ]] && env+=(OPSPAWN_CONFIG="$config")
    env "${env[@]}" "$binary" serve >"$data/stdout" 2>"$data/log" &
    server_pid=$!
    for _ in $(seq 1 240); do
        if grep -qx "plugins ready" "$data/stdout"; then
            server_url="$(sed -n 's/^opspawn listening on //p' "$data/stdout")"
            return
        fi
        if ! kill -0 "$server_pid" 2>/dev/null; then
            echo "the server exited while starting; its log:" >&2
            cat "$data/log" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "the server did not load its plugins within 120 s; its log:" >&2
    cat "$data/log" >&2
    exit 1
}

# fuzz NAME [schemathesis options...]: runs schemathesis against the server
# from its own /openapi.json; on failure, shows the server's log.
fuzz() {
    local name="$1"
    shift
    echo "==> schemathesis, $name ($seconds s at most)"
    # One worker: with two, hypothesis parses source from two threads at
    # once, and CPython 3.11's `ast.parse` is not safe for that (it failed a
    # cold CI run with "AST constructor recursion depth mismatch").
    if ! "$api_fuzz_venv/bin/schemathesis" run "$server_url/openapi.json" \
        --checks "$checks" --max-time "$seconds" --workers 1 --request-timeout 15 "$@"; then
        echo "schemathesis found failures ($name); the server's log:" >&2
        tail -n 100 "$work/$name/log" >&2
        exit 1
    fi
}

start_server auth-off
fuzz auth-off
stop_server

# A token, configured as the README says: the lines `opspawn token new` prints.
issued="$("$binary" token new --tenant fuzz --name api-fuzz)"
token="$(sed -n '2s/^ *//p' <<<"$issued")"
sed -n '/\[\[auth.tokens\]\]/,$s/^ *//p' <<<"$issued" >"$work/auth.toml"
start_server auth-on "$work/auth.toml"
# ignored_auth: an operation that needs the token must refuse a request
# without it, or with a wrong one.
checks+=,ignored_auth
fuzz auth-on -H "Authorization: Bearer $token"
stop_server
echo "==> schemathesis: no failures, with authentication off and on"
