#!/usr/bin/env bash
# The test command (README, and .ci/run calls exactly this): sets up (libtorch, promtool, build) and
# runs every test in the workspace: unit tests, gradient checks and whole-system tests.
# Arguments replace `--workspace` and go to `cargo test` (e.g. scripts/test.sh -p metatrain-coordinator).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/env.sh"

# promtool checks the /metrics exposition format (Debian package `prometheus`).
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "metatrain test: installing promtool (apt-get install prometheus)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
      || echo "warning: could not install promtool; the exposition-format check will be skipped outside CI" >&2
  fi
fi

"$here/scripts/setup.sh"
cd "$here"
if [ $# -gt 0 ]; then
  cargo test --release "$@"
else
  cargo test --release --workspace
fi
