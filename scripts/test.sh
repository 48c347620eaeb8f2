#!/usr/bin/env bash
# Installs what the tests need, then runs every test: lint, Rust unit and integration
# tests (the store conformance suite on SQLite and PostgreSQL), and the independent
# aws CLI / boto3 suite against the real binary on SQLite and on PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

echo "== lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== build"
cargo build --workspace --all-targets --quiet

pgdir=$(mktemp -d /tmp/updraft-test-pg.XXXXXX)
trap 'scripts/pg-temp.sh stop "$pgdir"' EXIT
UPDRAFT_TEST_POSTGRES_URL=$(scripts/pg-temp.sh start "$pgdir")
export UPDRAFT_TEST_POSTGRES_URL

echo "== rust tests"
cargo test --workspace --quiet

export UPDRAFT_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/updraft"
echo "== aws CLI / boto3 suite (SQLite)"
.venv/bin/python -m pytest tests/aws -q
echo "== aws CLI / boto3 suite (PostgreSQL)"
UPDRAFT_TEST_DATABASE="$UPDRAFT_TEST_POSTGRES_URL" .venv/bin/python -m pytest tests/aws -q
echo "== all tests passed"
