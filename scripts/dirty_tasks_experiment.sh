#!/usr/bin/env bash
# The dirty-task experiment of docs/dirty-tasks.md, in one command: 20 % of the training tasks corrupted
# on purpose, plain MAML against curriculum + quarantine (+ a trimmed mean), three seeds each, on
# noisy-linear (configs/sweep-dirty-noisy-linear.toml, ~10 min on 2 cores) and Omniglot 5-way 1-shot
# (configs/sweep-dirty-omniglot.toml, ~40 min). Writes OUT/noisy-linear/ and OUT/omniglot/ (one sweep
# each: summary.md, summary-groups.csv, comparison.png) and OUT/results.md with both tables.
#   scripts/dirty_tasks_experiment.sh [OUT] [extra `metatrain sweep` options, e.g. --local-workers 4]
# OUT defaults to runs/dirty-tasks. Re-running skips finished runs and resumes interrupted ones.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/env.sh disable=SC1091
source "$here/scripts/env.sh"
out="${1:-$here/runs/dirty-tasks}"
shift $(( $# > 0 ? 1 : 0 ))
"$here/scripts/setup.sh"
for dist in noisy-linear omniglot; do
  "$METATRAIN_BIN/metatrain" sweep --config "$here/configs/sweep-dirty-$dist.toml" --out "$out/$dist" "$@"
done
{
  echo "# Dirty-task experiment: held-out results"
  for dist in noisy-linear omniglot; do
    echo
    echo "## $dist"
    sed -n '/^## Over seeds/,$p' "$out/$dist/summary.md" | tail -n +2
  done
} > "$out/results.md"
cat "$out/results.md"
echo "wrote $out/results.md"
