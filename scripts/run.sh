#!/usr/bin/env bash
# The main job (README): sets up, then meta-trains MAML on the sinusoid benchmark with a local cluster of
# 2 worker processes over QUIC. Extra arguments go to `metatrain train` (e.g. --steps 2000, --out DIR,
# --config configs/omniglot-5w1s.toml).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/env.sh disable=SC1091
source "$here/scripts/env.sh"
"$here/scripts/setup.sh"
has_config=0
for a in "$@"; do case "$a" in --config|-c|--config=*) has_config=1 ;; esac; done
if [ "$has_config" = 1 ]; then
  exec "$METATRAIN_BIN/metatrain" train "$@"
else
  exec "$METATRAIN_BIN/metatrain" train --config "$here/configs/sinusoid.toml" "$@"
fi
