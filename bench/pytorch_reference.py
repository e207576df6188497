#!/usr/bin/env python3
"""PyTorch CPU baseline for the worker's meta-gradient throughput (tasks per second).

Per task it does exactly what `metatrain-worker` does: (1) the pre-adaptation query loss under no_grad;
(2) the inner loop, K times: support loss, grads = autograd.grad(loss, fast, create_graph=second_order),
fast = p - lr * g.clamp(-10, 10); (3) the query loss at the adapted parameters; (4) the meta-gradient,
autograd.grad(query_loss, theta), theta being leaf copies of the initial parameters. `maml` is second order,
`fomaml` first order (inner gradients are constants). Models (functional, f32; same definitions as
scripts/pytorch_reference.py, plus conv4):

  mlp     Linear(1,40) ReLU Linear(40,40) ReLU Linear(40,1); support 10, query 10, MSE; K=1, lr 0.01
  mlp-ln  Linear(2,64) LN ReLU Linear(64,64) LN ReLU Linear(64,1); support 30, query 20, MSE; K=5, lr 0.1
  conv4   4 x [conv 3x3/64 stride 2 pad 1, batch_norm (batch statistics), ReLU], Linear(256,5);
          [n,1,28,28] inputs, 5-way 1-shot: support 5, query 25, log_softmax + nll_loss; K=1, lr 0.4

Two implementations are timed on T tasks per iteration (random, seeded data of the right shapes):
  loop  one task at a time with torch.autograd (the per-task reference);
  vmap  torch.func.vmap over a functional per-task meta-gradient built with torch.func.grad (FOMAML: the
        inner gradient is taken at detached parameters, so it is a constant for the outer gradient).
Before timing, both are run on the timed batch in f64 and their meta-gradients compared (max |a-b| / max |b|
per parameter, see max_rel_diff); the script exits 1 if that exceeds 1e-4 (it is ~1e-13 or less). The check is
in f64 because in f32 a ReLU input within rounding noise of 0 (conv4 has ~0.4M activations per task) can flip
between the two implementations and change the meta-gradient by up to ~1e-2 relative; that f32 difference is
reported too (vmap_max_rel_diff_f32) but not checked. Each measurement warms up, then repeats whole iterations
for about --seconds (time.perf_counter); timing is in f32.

Usage: bench/pytorch_reference.py --model conv4 --algo maml [--tasks 32] [--threads 1] [--seconds 3] [--device cuda:0] [--json]
       bench/pytorch_reference.py --all --json        (all 6 model x algo combinations, one JSON line each)
Needs a full torch (pip install torch==2.11.0 numpy), e.g. ~/.cache/metatrain/torch-full/bin/python;
runs on CPU only.
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import grad, grad_and_value, vmap

CLAMP = 10.0
# model: (support size, query size, inner steps, inner lr)
CONFIG = {"mlp": (10, 10, 1, 0.01), "mlp-ln": (30, 20, 5, 0.1), "conv4": (5, 25, 1, 0.4)}
TOL = 1e-4


def init_params(model, gen_seed=0):
    """PyTorch default init (Linear / Conv2d); norm weights 1, biases 0. Order as in the Rust models."""
    torch.manual_seed(gen_seed)
    ps = []
    if model == "mlp":
        for i, o in [(1, 40), (40, 40), (40, 1)]:
            lin = nn.Linear(i, o)
            ps += [lin.weight, lin.bias]
    elif model == "mlp-ln":
        for i, o in [(2, 64), (64, 64)]:
            lin = nn.Linear(i, o)
            ps += [lin.weight, lin.bias, torch.ones(o), torch.zeros(o)]
        lin = nn.Linear(64, 1)
        ps += [lin.weight, lin.bias]
    else:
        for cin in [1, 64, 64, 64]:
            conv = nn.Conv2d(cin, 64, 3, stride=2, padding=1)
            ps += [conv.weight, conv.bias, torch.ones(64), torch.zeros(64)]
        lin = nn.Linear(256, 5)
        ps += [lin.weight, lin.bias]
    return tuple(p.detach().clone().float() for p in ps)


def make_tasks(model, T, seed):
    """Stacked task data [T, n, ...]: sinusoids, noisy linear functions, or random 5-way 1-shot images."""
    g = torch.Generator().manual_seed(seed)
    ns, nq, _, _ = CONFIG[model]
    if model == "mlp":
        amp, phase = 0.1 + 4.9 * torch.rand(T, 1, 1, generator=g), math.pi * torch.rand(T, 1, 1, generator=g)
        sx, qx = (10 * torch.rand(T, n, 1, generator=g) - 5 for n in (ns, nq))
        return sx, amp * torch.sin(sx - phase), qx, amp * torch.sin(qx - phase)
    if model == "mlp-ln":
        w, b = torch.randn(T, 2, 1, generator=g), torch.randn(T, 1, 1, generator=g)
        sx, qx = torch.randn(T, ns, 2, generator=g), torch.randn(T, nq, 2, generator=g)
        noise = lambda n: 0.1 * torch.randn(T, n, 1, generator=g)  # noqa: E731
        return sx, sx @ w + b + noise(ns), qx, qx @ w + b + noise(nq)
    sx, qx = torch.rand(T, ns, 1, 28, 28, generator=g), torch.rand(T, nq, 1, 28, 28, generator=g)
    sy, qy = torch.arange(5).repeat(T, 1), torch.arange(5).repeat(T, 5)  # each class once / 5 times
    return sx, sy, qx, qy


def forward(model, p, x):
    if model == "mlp":
        h = F.relu(F.linear(x, p[0], p[1]))
        h = F.relu(F.linear(h, p[2], p[3]))
        return F.linear(h, p[4], p[5])
    if model == "mlp-ln":
        h = F.linear(x, p[0], p[1])
        h = F.relu(F.layer_norm(h, (h.shape[-1],), p[2], p[3], eps=1e-5))
        h = F.linear(h, p[4], p[5])
        h = F.relu(F.layer_norm(h, (h.shape[-1],), p[6], p[7], eps=1e-5))
        return F.linear(h, p[8], p[9])
    h = x
    for i in range(4):
        w, b, gamma, beta = p[4 * i:4 * i + 4]
        h = F.conv2d(h, w, b, stride=2, padding=1)
        h = F.relu(F.batch_norm(h, None, None, gamma, beta, training=True, eps=1e-5))
    return F.linear(h.flatten(1), p[16], p[17])


def loss_fn(model, p, x, y):
    out = forward(model, p, x)
    return F.nll_loss(F.log_softmax(out, dim=-1), y) if model == "conv4" else F.mse_loss(out, y)


def loop_task(model, algo, params, sx, sy, qx, qy):
    """One task with torch.autograd, as the worker does it: (meta-gradient, query loss, pre-adaptation loss)."""
    _, _, steps, lr = CONFIG[model]
    theta = [t.detach().clone().requires_grad_(True) for t in params]
    with torch.no_grad():
        pre = loss_fn(model, theta, qx, qy)
    fast = list(theta)
    for _ in range(steps):
        loss = loss_fn(model, fast, sx, sy)
        gs = torch.autograd.grad(loss, fast, create_graph=algo == "maml")
        fast = [p - lr * g.clamp(-CLAMP, CLAMP) for p, g in zip(fast, gs)]
    query = loss_fn(model, fast, qx, qy)
    return torch.autograd.grad(query, theta), query.detach(), pre


def run_loop(model, algo, params, data):
    return [loop_task(model, algo, params, *(d[t] for d in data)) for t in range(data[0].shape[0])]


def make_vmap(model, algo):
    """A function (params, *stacked data) -> (meta-gradients [T, ...] per parameter, query losses, pre losses)."""
    _, _, steps, lr = CONFIG[model]

    def support_loss(fast, x, y):
        return loss_fn(model, fast, x, y)

    def adapted_query_loss(theta, sx, sy, qx, qy):
        fast = theta
        for _ in range(steps):
            if algo == "maml":
                gs = grad(support_loss)(fast, sx, sy)
            else:  # first order: the inner gradient is a constant w.r.t. theta
                gs = grad(support_loss)(tuple(p.detach() for p in fast), sx, sy)
            fast = tuple(p - lr * g.clamp(-CLAMP, CLAMP) for p, g in zip(fast, gs))
        return loss_fn(model, fast, qx, qy)

    meta = vmap(grad_and_value(adapted_query_loss), in_dims=(None, 0, 0, 0, 0))
    pre_loss = vmap(lambda p, x, y: loss_fn(model, p, x, y), in_dims=(None, 0, 0))

    def run(params, sx, sy, qx, qy):
        with torch.no_grad():
            pre = pre_loss(params, qx, qy)
        gs, query = meta(params, sx, sy, qx, qy)
        return gs, query, pre

    return run


def max_rel_diff(loop_out, vmap_out):
    """Max over parameters (and the query losses) of max |vmap - loop| / scale. A parameter's scale is the larger of
    its own max |loop| and 1% of the whole meta-gradient's: conv4's conv biases feed a batch norm, so their true
    gradient is 0 and both sides hold only rounding noise there (~1e-7 in f32)."""
    stacked = [torch.stack([r[0][i] for r in loop_out]) for i in range(len(vmap_out[0]))]
    floor = 0.01 * max(l.abs().max().item() for l in stacked)
    rel = [((v - l).abs().max() / max(l.abs().max().item(), floor, 1e-12)).item() for l, v in zip(stacked, vmap_out[0])]
    q = torch.stack([r[1] for r in loop_out])
    rel.append(((vmap_out[1] - q).abs().max() / q.abs().max().clamp_min(1e-12)).item())
    return max(rel)


def tasks_per_s(fn, T, seconds, device, warmup=2):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        sync()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n * T / elapsed


def bench(model, algo, T, seconds, threads, device):
    params = tuple(t.to(device) for t in init_params(model))
    data = tuple(t.to(device) for t in make_tasks(model, T, seed=1))
    vm = make_vmap(model, algo)
    f64 = [tuple(t.double() if t.is_floating_point() else t for t in ts) for ts in (params, data)]
    diff = max_rel_diff(run_loop(model, algo, *f64), vm(f64[0], *f64[1]))
    if not diff <= TOL:
        sys.exit(f"FAIL {model} {algo}: vmap meta-gradients differ from the loop's, max rel diff {diff:.3e} > {TOL}")
    diff32 = max_rel_diff(run_loop(model, algo, params, data), vm(params, *data))
    return {
        "model": model, "algo": algo, "threads": threads, "tasks": T,
        "device": str(device),
        "loop_tasks_per_s": round(tasks_per_s(lambda: run_loop(model, algo, params, data), T, seconds, device), 1),
        "vmap_tasks_per_s": round(tasks_per_s(lambda: vm(params, *data), T, seconds, device), 1),
        "vmap_max_rel_diff": float(f"{diff:.3e}"), "vmap_max_rel_diff_f32": float(f"{diff32:.3e}"),
        "torch": torch.__version__,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=[*CONFIG, "all"], default="mlp")
    ap.add_argument("--algo", choices=["maml", "fomaml", "all"], default="maml")
    ap.add_argument("--all", action="store_true", help="same as --model all --algo all")
    ap.add_argument("--tasks", type=int, default=32, help="tasks per iteration (the vmap batch size)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (interop threads: 1)")
    ap.add_argument("--seconds", type=float, default=3.0, help="target time per measurement")
    ap.add_argument("--json", action="store_true", help="one JSON line per combination")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N (timings synchronise the GPU)")
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    models = list(CONFIG) if a.all or a.model == "all" else [a.model]
    algos = ["maml", "fomaml"] if a.all or a.algo == "all" else [a.algo]
    if not a.json:
        print(f"torch {torch.__version__}, {a.threads} thread(s), {a.tasks} tasks per iteration, ~{a.seconds:g} s each")
        print(f"{'model':8s} {'algo':7s} {'loop tasks/s':>13s} {'vmap tasks/s':>13s} {'speedup':>8s}"
              f" {'rel diff f64':>13s} {'rel diff f32':>13s}")
    for model in models:
        for algo in algos:
            r = bench(model, algo, a.tasks, a.seconds, a.threads, device)
            if a.json:
                print(json.dumps(r), flush=True)
            else:
                speedup = r["vmap_tasks_per_s"] / r["loop_tasks_per_s"]
                print(f"{model:8s} {algo:7s} {r['loop_tasks_per_s']:13.1f} {r['vmap_tasks_per_s']:13.1f} "
                      f"{speedup:7.2f}x {r['vmap_max_rel_diff']:13.2e} {r['vmap_max_rel_diff_f32']:13.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
