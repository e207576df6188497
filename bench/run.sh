#!/usr/bin/env bash
# metatrain's benchmarks, each printing ratios against a baseline measured in the same run:
#   worker       metatrain-worker bench (per-task loop, batched) beside bench/pytorch_reference.py (per-task
#                loop, torch.func.vmap) on the same models, task shapes and inner loops, 1 thread each;
#   scaling      meta-steps/s of `metatrain train` (sinusoid: coordinator-bound; noisy-linear MAML with 5
#                inner steps: compute-bound) with 1, 2 and 4 local worker processes (vs 1);
#   coordinator  `metatrain bench coordinator`: the coordinator alone against simulated workers;
#   wire         `metatrain bench wire`: QUIC flow-control windows against round-trip time;
#   memory       the coordinator's peak memory at 100M parameters, with and without its memory budgets
#                (not in the default set: ~7 minutes, up to 10 GB).
# Usage: bench/run.sh [worker] [scaling] [coordinator] [wire] [memory]   (default: the first four)
# Environment: BENCH_SECONDS (per measurement, default 3), BENCH_TASKS (tasks per round, default 32),
#   BENCH_PYTHON (a python with torch 2.11.0; default: a venv made once under $METATRAIN_CACHE/torch-full,
#   a ~2.6 GB download). Results (JSON lines) go to target/bench/. Run it on an otherwise idle machine.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
# shellcheck source=scripts/env.sh disable=SC1091
source scripts/env.sh
seconds="${BENCH_SECONDS:-3}"
tasks="${BENCH_TASKS:-32}"
out="$here/target/bench"
mkdir -p "$out"
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(worker scaling coordinator wire)
for s in "${sections[@]}"; do
  case "$s" in worker | scaling | coordinator | wire | memory) ;; *) echo "error: unknown section $s (worker, scaling, coordinator, wire, memory)" >&2; exit 2 ;; esac
done

scripts/setup.sh >&2
export PATH="$METATRAIN_BIN:$PATH"
nproc_=$(nproc)
echo "machine: $nproc_ cores, $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (uncommitted changes)')"

python_for_torch() {
  if [ -n "${BENCH_PYTHON:-}" ]; then echo "$BENCH_PYTHON"; return; fi
  local venv="$METATRAIN_CACHE/torch-full"
  if ! "$venv/bin/python" -c "import torch, numpy" 2>/dev/null; then
    echo "bench: installing torch==$TORCH_VERSION into $venv (about 2.6 GB, once)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" numpy safetensors >&2
  fi
  echo "$venv/bin/python"
}

run_worker() {
  local py rs=$out/worker-metatrain.jsonl pt=$out/worker-pytorch.jsonl
  py="$(python_for_torch)"
  : >"$rs"
  : >"$pt"
  echo
  echo "== worker: meta-gradient tasks/s, 1 thread, $tasks tasks per round, ${seconds}s per measurement"
  for cfg in sinusoid noisy-linear omniglot-5w1s; do
    echo "  metatrain-worker bench --config configs/$cfg.toml" >&2
    metatrain-worker bench --config "configs/$cfg.toml" --batch "$tasks" --seconds "$seconds" --json 2>/dev/null >>"$rs"
  done
  echo "  bench/pytorch_reference.py --all" >&2
  "$py" bench/pytorch_reference.py --all --tasks "$tasks" --seconds "$seconds" --json >>"$pt"
  "$py" - "$rs" "$pt" <<'EOF'
import json, sys
rs = {(r["model"], r["algo"]): r for r in map(json.loads, open(sys.argv[1]))}
pt = {(r["model"], r["algo"]): r for r in map(json.loads, open(sys.argv[2]))}
print(f"PyTorch {next(iter(pt.values()))['torch']}; ratios are against PyTorch's per-task loop unless named")
head = ("model", "algo", "torch loop", "torch vmap", "mt loop", "mt batched", "mt loop/torch loop",
        "batched/torch loop", "batched/vmap")
print("{:<7} {:<7} {:>10} {:>10} {:>10} {:>10} {:>18} {:>18} {:>12}".format(*head))
for key in sorted(rs, key=lambda k: (["mlp", "mlp-ln", "conv4"].index(k[0]), k[1] != "maml")):
    r, p = rs[key], pt.get(key)
    if p is None:
        continue
    tl, tv, ml, mb = p["loop_tasks_per_s"], p["vmap_tasks_per_s"], r["loop_tasks_per_s"], r["batched_tasks_per_s"]
    print(f"{key[0]:<7} {key[1]:<7} {tl:>10.1f} {tv:>10.1f} {ml:>10.1f} {mb:>10.1f} {ml/tl:>17.2f}x {mb/tl:>17.2f}x {mb/tv:>11.2f}x")
EOF
}

run_scaling() {
  local steps=$((BENCH_SECONDS_SCALING_STEPS))
  echo
  echo "== scaling: metatrain train, ${steps} meta-steps, no evaluation, 1/2/4 local worker processes ($nproc_ cores)"
  printf "%-28s %-9s %12s %10s\n" config workers steps/s "vs 1"
  for cfg in sinusoid noisy-linear; do
    local base=""
    for n in 1 2 4; do
      local dir secs rate
      dir="$(mktemp -d)"
      metatrain train --config "configs/$cfg.toml" --local-workers "$n" --set "train.steps=$steps" \
        --set eval.every=0 --set eval.final_tasks=0 --out "$dir/run" >"$dir/log" 2>&1
      secs=$(sed -n 's/.*run finished: [0-9]* meta-steps in \([0-9.]*\)s.*/\1/p' "$dir/log")
      rate=$(awk -v s="$steps" -v t="$secs" 'BEGIN { printf "%.1f", s / t }')
      [ -z "$base" ] && base=$rate
      printf "%-28s %-9s %12s %9.2fx\n" "$cfg" "$n" "$rate" "$(awk -v a="$rate" -v b="$base" 'BEGIN { print a / b }')"
      echo "{\"config\":\"$cfg\",\"workers\":$n,\"steps\":$steps,\"seconds\":$secs,\"steps_per_s\":$rate}" >>"$out/scaling.jsonl"
      rm -rf "$dir"
    done
  done
  echo "(each local worker is one process with one compute thread; beyond $nproc_ processes they share cores with"
  echo " each other and with the coordinator)"
}

run_coordinator() {
  echo
  echo "== coordinator alone, simulated workers"
  metatrain bench coordinator
}

# Not in the default set (about 7 minutes and up to 10 GB): the coordinator's peak memory at 100M
# parameters as the meta-batch grows, without binding budgets (the behaviour before them), with the
# default cluster.receive_memory_mb / reorder_memory_mb, and with tight ones.
run_memory() {
  local name opts
  for run in "unbounded:--reorder-memory-mb 1000000 --receive-memory-mb 1000000" "defaults:" \
    "tight:--reorder-memory-mb 0 --receive-memory-mb 400"; do
    name="${run%%:*}"
    opts="${run#*:}"
    echo
    echo "== coordinator memory at 100M parameters: $name budgets ${opts:-(defaults)}"
    # shellcheck disable=SC2086 # $opts is a list of options
    metatrain bench coordinator --layouts 100m --workers 1,4,8 --tasks-per-worker 2 --warmup 1 --steps 2 \
      --min-seconds 0 --max-step-gb 10 --max-memory-gb 20 $opts
  done
}

run_wire() {
  echo
  echo "== QUIC flow-control windows against round-trip time (delaying UDP proxy on loopback)"
  metatrain bench wire --rtt-ms 1,10,50,100 --windows-mib 1,4,16,64 --mib 128
}

BENCH_SECONDS_SCALING_STEPS="${BENCH_SCALING_STEPS:-2000}"
: >"$out/scaling.jsonl"
for s in "${sections[@]}"; do "run_$s"; done
