#!/usr/bin/env python3
"""PyTorch reference for `metatrain-worker grad`: the same meta-gradient with torch.autograd.

Two uses:

  pytorch_reference.py grad --model mlp-ln --algo maml --inner-steps 3 --inner-lr 0.02 [--clamp 5] \
      --params P.safetensors --data D.safetensors --out G.safetensors
      computes what `metatrain-worker grad` computes, with the same inputs and outputs;

  pytorch_reference.py check [--worker target/release/metatrain-worker]
      makes random f64 parameters and tasks for mlp and mlp-ln, runs both implementations for MAML and
      FOMAML with 1 and 3 inner steps (clamping included), and prints the largest relative difference.
      Exits 1 if any exceeds 1e-9.

Needs a full `pip install torch==2.11.0 safetensors numpy` (not the libtorch-only install the build uses).
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

NAMES = {
    "mlp": ["layer1.weight", "layer1.bias", "layer2.weight", "layer2.bias", "layer3.weight", "layer3.bias"],
    "mlp-ln": [
        "layer1.weight", "layer1.bias", "norm1.weight", "norm1.bias", "layer2.weight", "layer2.bias",
        "norm2.weight", "norm2.bias", "layer3.weight", "layer3.bias",
    ],
}
HIDDEN = {"mlp": 40, "mlp-ln": 64}


def forward(model, p, x):
    if model == "mlp":
        h = F.relu(F.linear(x, p[0], p[1]))
        h = F.relu(F.linear(h, p[2], p[3]))
        return F.linear(h, p[4], p[5])
    h = F.linear(x, p[0], p[1])
    h = F.relu(F.layer_norm(h, (h.shape[-1],), p[2], p[3], eps=1e-5))
    h = F.linear(h, p[4], p[5])
    h = F.relu(F.layer_norm(h, (h.shape[-1],), p[6], p[7], eps=1e-5))
    return F.linear(h, p[8], p[9])


def meta_gradient(model, algo, steps, lr, clamp, params, data):
    theta = [t.detach().clone().requires_grad_(True) for t in params]
    sx, qx = data["support_x"], data["query_x"]
    sy, qy = data["support_y"].reshape(-1, 1), data["query_y"].reshape(-1, 1)
    with torch.no_grad():
        pre = F.mse_loss(forward(model, theta, qx), qy)
    second_order = algo == "maml"
    fast = list(theta)
    for _ in range(steps):
        loss = F.mse_loss(forward(model, fast, sx), sy)
        grads = torch.autograd.grad(loss, fast, create_graph=second_order)
        fast = [p - lr * (g.clamp(-clamp, clamp) if clamp is not None else g) for p, g in zip(fast, grads)]
    query = F.mse_loss(forward(model, fast, qx), qy)
    return torch.autograd.grad(query, theta), query.detach(), pre


def grad_command(a):
    data = load_file(a.data)
    params_file = load_file(a.params)
    dtype = data["support_x"].dtype
    params = [params_file[n].to(dtype) for n in NAMES[a.model]]
    data = {k: v.to(dtype) for k, v in data.items()}
    g, q, pre = meta_gradient(a.model, a.algo, a.inner_steps, a.inner_lr, a.clamp, params, data)
    out = {n: t.contiguous() for n, t in zip(NAMES[a.model], g)}
    out["query_loss"] = q.reshape(1)
    out["pre_adapt_loss"] = pre.reshape(1)
    save_file(out, a.out)


def check(a):
    torch.manual_seed(0)
    worker = Path(a.worker)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model in ["mlp", "mlp-ln"]:
            d_in = 1 if model == "mlp" else 2
            h = HIDDEN[model]
            shapes = {
                "layer1.weight": (h, d_in), "layer1.bias": (h,), "layer2.weight": (h, h), "layer2.bias": (h,),
                "layer3.weight": (1, h), "layer3.bias": (1,),
                "norm1.weight": (h,), "norm1.bias": (h,), "norm2.weight": (h,), "norm2.bias": (h,),
            }
            params = {}
            for n in NAMES[model]:
                t = torch.randn(shapes[n], dtype=torch.float64) * (0.3 if "weight" in n and "norm" not in n else 0.1)
                if n.startswith("norm") and n.endswith("weight"):
                    t = 1.0 + t
                params[n] = t
            w = torch.randn(d_in, 1, dtype=torch.float64)
            sx = torch.randn(12, d_in, dtype=torch.float64)
            qx = torch.randn(9, d_in, dtype=torch.float64)
            data = {"support_x": sx, "support_y": (sx @ w).reshape(-1) + 0.1 * torch.randn(12, dtype=torch.float64),
                    "query_x": qx, "query_y": qx @ w + 0.1 * torch.randn(9, 1, dtype=torch.float64)}
            save_file(params, tmp / "p.safetensors")
            save_file(data, tmp / "d.safetensors")
            for algo in ["maml", "fomaml"]:
                for steps, clamp in [(1, None), (3, 0.5)]:
                    cmd = [str(worker), "grad", "--model", model, "--algo", algo, "--inner-steps", str(steps),
                           "--inner-lr", "0.05", "--params", str(tmp / "p.safetensors"),
                           "--data", str(tmp / "d.safetensors"), "--out", str(tmp / "g.safetensors")]
                    if clamp is not None:
                        cmd += ["--clamp", str(clamp)]
                    subprocess.run(cmd, check=True, capture_output=True)
                    ours = load_file(tmp / "g.safetensors")
                    g, q, _ = meta_gradient(model, algo, steps, 0.05, clamp, [params[n] for n in NAMES[model]], data)
                    rel = max(
                        ((ours[n] - t).abs().max() / t.abs().max().clamp_min(1e-12)).item()
                        for n, t in zip(NAMES[model], g)
                    )
                    rel = max(rel, abs(ours["query_loss"].item() - q.item()) / max(abs(q.item()), 1e-12))
                    worst = max(worst, rel)
                    print(f"{model:7s} {algo:7s} K={steps} clamp={clamp}: max relative difference {rel:.2e}")
    print(f"worst: {worst:.2e}")
    return 0 if worst < 1e-9 else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("grad")
    g.add_argument("--model", choices=["mlp", "mlp-ln"], required=True)
    g.add_argument("--algo", choices=["maml", "fomaml"], required=True)
    g.add_argument("--inner-steps", type=int, required=True)
    g.add_argument("--inner-lr", type=float, required=True)
    g.add_argument("--clamp", type=float)
    g.add_argument("--params", required=True)
    g.add_argument("--data", required=True)
    g.add_argument("--out", required=True)
    c = sub.add_parser("check")
    target = os.environ.get("CARGO_TARGET_DIR") or str(Path(__file__).resolve().parent.parent / "target")
    c.add_argument("--worker", default=str(Path(target) / "release/metatrain-worker"))
    a = ap.parse_args()
    if a.cmd == "grad":
        grad_command(a)
        return 0
    return check(a)


if __name__ == "__main__":
    sys.exit(main())
