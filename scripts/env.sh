# shellcheck shell=bash
# Sourced by the other scripts: where libtorch lives and how cargo finds it.
# METATRAIN_CACHE (default ~/.cache/metatrain) holds libtorch outside the checkout so every clone reuses it.
METATRAIN_CACHE="${METATRAIN_CACHE:-$HOME/.cache/metatrain}"
TORCH_VERSION="2.11.0"
export LIBTORCH="${LIBTORCH:-$METATRAIN_CACHE/libtorch-$TORCH_VERSION/torch}"
# tch 0.24 names an older libtorch; 2.11.0 is ABI-compatible for the ops we use and matches the GPU machines.
export LIBTORCH_BYPASS_VERSION_CHECK=1
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Where cargo puts the binaries (it honours CARGO_TARGET_DIR, so the scripts do too).
METATRAIN_BIN="${CARGO_TARGET_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target}/release"
export METATRAIN_BIN
