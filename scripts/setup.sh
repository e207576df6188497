#!/usr/bin/env bash
# One-time (idempotent) set-up used by run.sh, scripts/test.sh and .ci/run:
#   1. installs libtorch 2.11.0 from the PyPI wheels into $METATRAIN_CACHE when it is missing;
#   2. builds the workspace in release mode (METATRAIN_CUDA=1 for a CUDA build).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/env.sh"

if [ ! -f "$LIBTORCH/lib/libtorch_cpu.so" ]; then
  echo "metatrain setup: installing libtorch $TORCH_VERSION into $METATRAIN_CACHE (about 540 MB download, once)"
  command -v python3 >/dev/null || { echo "error: python3 with pip is needed to fetch libtorch" >&2; exit 1; }
  mkdir -p "$METATRAIN_CACHE"
  tmp="$(mktemp -d "$METATRAIN_CACHE/libtorch-$TORCH_VERSION.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$tmp" \
    "torch==$TORCH_VERSION" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
  rm -rf "$METATRAIN_CACHE/libtorch-$TORCH_VERSION"
  mv "$tmp" "$METATRAIN_CACHE/libtorch-$TORCH_VERSION"   # atomic: a half install is never picked up
  trap - EXIT
fi

if [ "${METATRAIN_SKIP_BUILD:-0}" != 1 ]; then
  features=()
  if [ "${METATRAIN_CUDA:-0}" = 1 ]; then features=(--features metatrain-worker/cuda); fi
  echo "metatrain setup: building (cargo build --release --workspace --bins${features:+ ${features[*]}})"
  (cd "$here" && cargo build --release --workspace --bins ${features[@]+"${features[@]}"})
fi
