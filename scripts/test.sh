#!/usr/bin/env bash
# The test suite: unit tests, the plugins' own tests, and the end-to-end
# tests against real server processes, on SQLite and on Postgres.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$repo_root"

ensure_wasm_target

echo "==> plugin unit tests (native)"
cargo test --release --manifest-path plugins/Cargo.toml --target-dir "$plugin_target_dir/native"

echo "==> host unit tests and end-to-end tests on SQLite"
cargo test --release --workspace
