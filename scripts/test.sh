#!/usr/bin/env bash
# The test command (README, and .ci/run calls exactly this): sets up (libtorch, promtool, build) and
# runs every test in the workspace: unit tests, gradient checks and whole-system tests.
# Arguments replace `--workspace` and go to `cargo test` (e.g. scripts/test.sh -p metatrain-coordinator).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/env.sh"

# promtool checks the /metrics exposition format, the dashboard's queries and the Prometheus config
# (Debian package `prometheus`); shellcheck checks the Slurm and Kubernetes scripts.
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "metatrain test: installing ${missing[*]} (apt-get)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null) \
      || echo "warning: could not install ${missing[*]}; checks that need them are skipped outside CI" >&2
  fi
fi
# yamllint and kubernetes-validate (with its bundled Kubernetes schemas) validate deploy/ offline.
pytools="${METATRAIN_PYTOOLS:-$HOME/.cache/metatrain/pytools}"
if [ ! -f "$pytools/.installed-1" ]; then
  echo "metatrain test: installing yamllint and kubernetes-validate into $pytools"
  if python3 -m pip install -q --disable-pip-version-check --target "$pytools" \
      kubernetes-validate==1.37.0 yamllint==1.38.0; then
    touch "$pytools/.installed-1"
  else
    echo "warning: could not install yamllint/kubernetes-validate; deploy/ checks are skipped outside CI" >&2
  fi
fi

"$here/scripts/setup.sh"
cd "$here"
# --no-fail-fast: one failing test binary must not hide the results of the others.
if [ $# -gt 0 ]; then
  cargo test --release --no-fail-fast "$@"
else
  cargo test --release --no-fail-fast --workspace
fi
