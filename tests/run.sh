#!/usr/bin/env bash
# The test command: installs what the tests talk to when missing (tests/setup.sh), then
# runs every test against real peers on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/setup.sh
cargo test --locked "$@"
