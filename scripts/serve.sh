#!/usr/bin/env bash
# The main job: builds the server and the example plugins, installs the
# plugins into the plugin folder, and serves on SQLite.
#
#   scripts/serve.sh [opspawn serve flags...]
#
# OPSPAWN_ADDR (default 127.0.0.1:8080), OPSPAWN_DATA_DIR (default
# ./opspawn-data) and OPSPAWN_PLUGIN_DIR (default <data dir>/plugins) apply.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$repo_root"

ensure_wasm_target
build_plugins
data_dir="${OPSPAWN_DATA_DIR:-$repo_root/opspawn-data}"
plugin_dir="${OPSPAWN_PLUGIN_DIR:-$data_dir/plugins}"
install_plugins "$plugin_dir"
echo "==> building the server"
cargo build --release -p opspawn
export OPSPAWN_DATA_DIR="$data_dir" OPSPAWN_PLUGIN_DIR="$plugin_dir"
exec "$CARGO_TARGET_DIR/release/opspawn" serve "$@"
