# Shared by the scripts in this folder: where builds go and how plugins build.
# shellcheck shell=bash

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Builds go outside the clone, to the same folder `.ci/run` uses, so that
# serving after testing (or after CI), or from a second clone, reuses what
# was built instead of building everything again; `target` in the clone
# links to it, so `target/release/opspawn` works as the README shows.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/opspawn/target}"
mkdir -p "$CARGO_TARGET_DIR"
if [[ ! -e "$repo_root/target" && "$CARGO_TARGET_DIR" != "$repo_root/target" ]]; then
    ln -s "$CARGO_TARGET_DIR" "$repo_root/target"
fi
# The guest plugins are their own workspace with their own target folder
# (the same one the tests' build script uses), so builds never wait on each other.
plugin_target_dir="$CARGO_TARGET_DIR/wasm32-plugins"
# The examples a server is given, as `name:member`: each member of the
# guest workspace (its Cargo.toml is the one list of the plugins) under the
# name of each manifest beside it. Most ship one; plugins/openai ships three,
# so the OpenAI-format adapter serves as openai, openrouter and
# openai-compatible, one component configured three ways.
example_plugins=()
while read -r member; do
    for manifest in "$repo_root/plugins/$member"/*.toml; do
        name="$(basename "$manifest" .toml)"
        [[ "$name" != Cargo ]] && example_plugins+=("$name:$member")
    done
done < <(sed -n '/^members = \[/,/\]/p' "$repo_root/plugins/Cargo.toml" | grep -o '"[^"]*"' | tr -d '"')

ensure_wasm_target() {
    if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx wasm32-wasip2; then
        echo "==> installing the wasm32-wasip2 target (plugins are built for it)"
        rustup target add wasm32-wasip2
    fi
}

build_plugins() {
    echo "==> building the example plugins for wasm32-wasip2"
    cargo build --release --target wasm32-wasip2 \
        --manifest-path "$repo_root/plugins/Cargo.toml" --target-dir "$plugin_target_dir"
}

# install_plugins DIR: copies the example components into DIR, each under
# the name of its manifest, with the manifest beside it.
install_plugins() {
    local dir="$1" name member component
    mkdir -p "$dir"
    for example in "${example_plugins[@]}"; do
        name="${example%%:*}" member="${example#*:}"
        # Cargo names the file after the package: dashes become underscores.
        component="${member##*/}"
        cp "$plugin_target_dir/wasm32-wasip2/release/${component//-/_}.wasm" "$dir/$name.wasm"
        cp "$repo_root/plugins/$member/$name.toml" "$dir/$name.toml"
    done
}

# ensure_venv VENV REQUIREMENTS WHAT: a virtualenv at VENV holding exactly
# REQUIREMENTS (pinned), made again whenever the pins change, and when it was
# made elsewhere (a target directory renamed or copied): its scripts' first
# lines name the folder it was made in, and fail once that is gone.
ensure_venv() {
    local venv="$1" requirements="$2" what="$3"
    if ! cmp -s "$requirements" "$venv/requirements.txt" \
        || [[ "$(cat "$venv/made-in" 2>/dev/null)" != "$venv" ]]; then
        echo "==> installing $what (${requirements#"$repo_root"/})"
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
        cp "$requirements" "$venv/requirements.txt"
        echo "$venv" >"$venv/made-in"
    fi
}

# ensure_npm DIR PINS WHAT: node_modules in DIR installed from PINS's
# package.json and package-lock.json, again whenever the lock changes.
ensure_npm() {
    local dir="$1" pins="$2" what="$3"
    mkdir -p "$dir"
    if ! cmp -s "$pins/package-lock.json" "$dir/package-lock.json"; then
        echo "==> installing $what (${pins#"$repo_root"/}/package.json)"
        cp "$pins/package.json" "$pins/package-lock.json" "$dir/"
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
    fi
}

# The toolchains that build Python and JavaScript plugins, installed from
# their registries into "$CARGO_TARGET_DIR/plugin-toolchains" (outside the
# clone, reused by later runs): componentize-py in a virtualenv, and
# componentize-js from npm. Versions are pinned in plugins/sdk/toolchains/.
plugin_toolchains="$CARGO_TARGET_DIR/plugin-toolchains"
ensure_plugin_toolchains() {
    local pins="$repo_root/plugins/sdk/toolchains"
    ensure_venv "$plugin_toolchains/venv" "$pins/requirements.txt" componentize-py
    ensure_npm "$plugin_toolchains/node" "$pins" componentize-js
}

# The Python and JavaScript example tools (plugins/word-count-python and
# plugins/word-count-js, on the kits in plugins/sdk), built into
# "$CARGO_TARGET_DIR/plugin-examples", where the end-to-end tests find them.
# Each is rebuilt only when its sources, the kit or the WIT changed (a
# build takes 10-20 s).
script_plugin_dir="$CARGO_TARGET_DIR/plugin-examples"
build_script_plugins() {
    ensure_plugin_toolchains
    mkdir -p "$script_plugin_dir"
    local wit="$repo_root/wit/v0.2.0" sdk="$repo_root/plugins/sdk"
    build_if_changed word-count-python "$sdk/python" -- \
        "$plugin_toolchains/venv/bin/componentize-py" -d "$wit" -w tool componentize \
        -p "$sdk/python" -p "$repo_root/plugins/word-count-python" app \
        -o "$script_plugin_dir/word-count-python.wasm"
    build_if_changed word-count-js "$sdk/js" -- \
        "$plugin_toolchains/node/node_modules/.bin/componentize-js" \
        "$repo_root/plugins/word-count-js/app.js" --wit "$wit" -n tool -d http fetch-event \
        -o "$script_plugin_dir/word-count-js.wasm"
}

# build_if_changed NAME KIT_DIR -- COMMAND...: runs COMMAND unless the
# sources of plugins/NAME, KIT_DIR and the WIT hash as they did last time.
build_if_changed() {
    local name="$1" kit="$2"
    shift 3
    local stamp="$script_plugin_dir/$name.sources"
    local sources
    sources="$(find "$repo_root/plugins/$name" "$kit" "$repo_root/wit/v0.2.0" \
        "$repo_root/plugins/sdk/toolchains" -type f -not -path '*/__pycache__/*' |
        sort | xargs cat | sha256sum)"
    if [[ -f "$script_plugin_dir/$name.wasm" ]] && [[ "$(cat "$stamp" 2>/dev/null)" == "$sources" ]]; then
        return
    fi
    echo "==> building the $name example plugin"
    "$@" >/dev/null
    cp "$repo_root/plugins/$name/$name.toml" "$script_plugin_dir/$name.toml"
    echo "$sources" >"$stamp"
}

# The MCP peers the end-to-end tests run against, installed from their
# registries into "$CARGO_TARGET_DIR/mcp-peers" (outside the clone, reused by
# later runs): the official Python SDK (`mcp` on PyPI, for the fixture server
# and the test clients) in a virtualenv, and the reference server
# `@modelcontextprotocol/server-everything` from npm. Versions are pinned in
# tests/fixtures/mcp/ (requirements.txt, package.json and package-lock.json).
ensure_mcp_peers() {
    local peers="$CARGO_TARGET_DIR/mcp-peers" fixtures="$repo_root/tests/fixtures/mcp"
    ensure_venv "$peers/venv" "$fixtures/requirements.txt" "the MCP Python SDK"
    ensure_npm "$peers/node" "$fixtures" "the MCP reference server"
}

# Schemathesis (PyPI), which scripts/api-fuzz.sh runs against a live server,
# in a virtualenv of its own in "$CARGO_TARGET_DIR/api-fuzz" (outside the
# clone, reused by later runs); pinned in tests/fixtures/api-fuzz/requirements.txt.
api_fuzz_venv="$CARGO_TARGET_DIR/api-fuzz/venv"
ensure_api_fuzzer() {
    ensure_venv "$api_fuzz_venv" "$repo_root/tests/fixtures/api-fuzz/requirements.txt" schemathesis
}

# Playwright for Python (PyPI), which drives the dashboard's browser tests
# (tests/integration/dashboard.rs), in a virtualenv in
# "$CARGO_TARGET_DIR/ui-tests" (outside the clone, reused by later runs);
# pinned in tests/fixtures/ui/requirements.txt. It drives Debian's Chromium,
# installed here when missing (about a minute, once per machine):
# Playwright's own browser downloads are never used.
ui_test_venv="$CARGO_TARGET_DIR/ui-tests/venv"
ensure_ui_test_deps() {
    ensure_venv "$ui_test_venv" "$repo_root/tests/fixtures/ui/requirements.txt" \
        "Playwright for Python"
    if [[ -x /usr/bin/chromium ]]; then
        return
    fi
    if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
        echo "/usr/bin/chromium is missing: the dashboard's browser tests need Debian's" >&2
        echo "chromium package; install it with: sudo apt-get install chromium chromium-driver" >&2
        exit 1
    fi
    echo "==> installing Chromium (the dashboard's browser tests)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
}

# The release build of the host workspace (dependencies, the server, the
# bench and every test), started in the background so that it runs while
# the tests' peers and tools are installed and the plugins' own tests run:
# those mostly wait on the network or use one core, and a cold build is
# most of a run. Its lines are marked `[host build]`.
host_build_pid=
start_host_build() {
    echo "==> building the host workspace and its tests in the background"
    cargo test --profile ci --workspace --no-run > >(sed -u 's/^/[host build] /') 2>&1 &
    host_build_pid=$!
    trap 'if [[ -n "$host_build_pid" ]]; then kill "$host_build_pid" 2>/dev/null || true; fi' EXIT
}

# Waits for start_host_build's build, failing as it did.
finish_host_build() {
    echo "==> waiting for the host build"
    local status=0
    wait "$host_build_pid" || status=$?
    host_build_pid=
    if [[ "$status" != 0 ]]; then
        echo "the host build failed (its lines above are marked [host build])" >&2
        exit "$status"
    fi
}

# Starts the machine's Postgres cluster if nothing answers on 127.0.0.1:5432.
ensure_postgres() {
    if (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
        return
    fi
    echo "==> starting Postgres"
    if ! command -v pg_ctlcluster >/dev/null; then
        echo "Postgres is not answering on 127.0.0.1:5432 and pg_ctlcluster is not installed;" >&2
        echo "start a server there (trust auth, database test) or set OPSPAWN_TEST_POSTGRES_URL." >&2
        exit 1
    fi
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
    for _ in $(seq 1 30); do
        (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null && return
        sleep 1
    done
    echo "Postgres did not start listening on 127.0.0.1:5432" >&2
    exit 1
}
