"""One-shot GPU check: throughput of every policy in half precision with and without torch.compile, a bf16-mixed
DTEM soft training step against fp32, and the fused-attention backward with the proportional-attention mask on
each SDPA backend. Nothing is downloaded (random-init weights). Exit code 1 when a gradient check fails.

Usage: python experiments/gpu_check.py                      (one CUDA GPU, about 5 minutes)
       python experiments/gpu_check.py --device cpu --tiny  (the logic, in seconds: what CI runs)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dtem_lightning import DTEMHard, DTEMSoft, NoMerge, ToMe, apply_policy

sys.path.insert(0, str(Path(__file__).parent))
from throughput import TINY, elapsed  # noqa: E402

BACKENDS = ["MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"]


def make_model(args: argparse.Namespace, policy: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(args.model, **(TINY if args.tiny else {})).eval()
    apply_policy(model, policy)
    return model.to(args.device, dtype), policy.to(args.device, dtype)


def throughput(args: argparse.Namespace, deadline: float) -> list[str]:
    """Rows: dtype, batch, compiled, policy, img/s, speed-up over NoMerge in the same setting."""
    side = TINY["img_size"] if args.tiny else 224
    rows = ["| dtype | batch | compile | policy | r | img/s | vs NoMerge |", "|---|---|---|---|---|---|---|"]
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for compiled in (False, True):
            models = []
            for cls in (NoMerge, ToMe, DTEMHard):
                model, policy = make_model(args, cls(r=0 if cls is NoMerge else args.r), dtype)
                fn = torch.compile(model, backend=args.compile_backend) if compiled else model
                models.append((cls.__name__, policy.r, fn))
            for batch in args.batches:
                if time.monotonic() > deadline:
                    rows.append(f"| {dtype_name} | {batch} | {compiled} | (skipped: time budget) | | | |")
                    continue
                x = torch.randn(batch, 3, side, side, device=args.device, dtype=dtype)
                times: dict[str, list[float]] = {name: [] for name, _, _ in models}
                with torch.inference_mode():
                    for rnd in range(args.warmup + args.runs):
                        for name, _, fn in models:  # round-robin: load changes hit every policy alike
                            dt, _ = elapsed(lambda: fn(x), args.device)  # noqa: B023 - called at once
                            if rnd >= args.warmup:
                                times[name].append(dt)
                base = batch / statistics.median(times["NoMerge"])
                for name, r, _ in models:
                    ips = batch / statistics.median(times[name])
                    rows.append(
                        f"| {dtype_name} | {batch} | {compiled} | {name} | {r} | {ips:.1f} | {ips / base:.2f}x |"
                    )
    return rows


def soft_step(args: argparse.Namespace) -> tuple[list[str], bool]:
    """One modular DTEM soft training step (backbone frozen, only the embedding trains) in fp32 and in
    bf16-mixed (autocast) on the same batch. The soft step picks k candidates and re-sorts by size, so the
    gradient is piecewise: the reference for "how far" is fp32 on the same batch rounded to bf16 (the input's
    rounding alone). Fails on a non-finite or all-zero gradient."""
    model, policy = make_model(args, DTEMSoft(r=args.r), torch.float32)
    model.requires_grad_(False)
    model.train()
    side = TINY["img_size"] if args.tiny else 224
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.train_batch, 3, side, side, generator=g).to(args.device)
    y = torch.randint(0, model.num_classes, (args.train_batch,), generator=g).to(args.device)
    grads, losses = {}, {}
    runs = {
        "fp32": (x, False),
        "fp32, input rounded to bf16": (x.bfloat16().float(), False),
        "bf16-mixed": (x, True),
    }
    for mode, (inp, mixed) in runs.items():
        policy.zero_grad(set_to_none=True)
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=mixed):
            loss = F.cross_entropy(model(inp), y)
        loss.backward()
        losses[mode] = float(loss)
        grads[mode] = torch.cat([p.grad.flatten().float() for p in policy.parameters() if p.grad is not None])
    ok = all(bool(v.isfinite().all()) and float(v.abs().sum()) > 0 for v in grads.values())
    rows = [f"DTEM soft step, r={args.r}, batch {args.train_batch}, modular (embedding gradient against fp32):", "",
            "| run | loss | cosine | relative L2 difference |", "|---|---|---|---|"]  # fmt: skip
    for mode, v in grads.items():
        a = grads["fp32"]
        cos, rel = float(F.cosine_similarity(a, v, dim=0)), float((a - v).norm() / a.norm().clamp_min(1e-30))
        rows.append(f"| {mode} | {losses[mode]:.4f} | {cos:.4f} | {rel:.2e} |")
    rows.append("" if ok else "FAILED: a non-finite or all-zero embedding gradient")
    return rows, ok


def sdpa_backends(args: argparse.Namespace) -> tuple[list[str], bool]:
    """Fused attention backward with a float proportional-attention mask (log sizes) on every SDPA backend,
    against the math backend in float32."""
    B, H, N, D = (2, 2, 17, 8) if args.tiny else (8, 6, 197, 64)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(args.device) for _ in range(3))
    size = torch.rand(B, 1, 1, N, generator=g).to(args.device) * 4 + 0.5
    mask = torch.log(size)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32

    def grads(backend: str, dt: torch.dtype) -> list[torch.Tensor]:
        inputs = [t.detach().clone().to(dt).requires_grad_() for t in (q, k, v)]
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            out = F.scaled_dot_product_attention(*inputs, attn_mask=mask.to(dt))
        out.float().square().sum().backward()
        return [t.grad.float() for t in inputs]

    ref = grads("MATH", torch.float32)
    rows, ok = (
        ["| SDPA backend | dtype | max abs grad diff vs math fp32 | status |", "|---|---|---|---|"],
        True,
    )
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    for backend in BACKENDS:
        try:
            got = grads(backend, dtype)
        except RuntimeError as e:
            rows.append(f"| {backend} | {dtype} | — | unavailable ({str(e).splitlines()[0][:60]}) |")
            continue
        diff = max(float((a - b).abs().max()) for a, b in zip(got, ref, strict=True))
        scale = max(float(r.abs().max()) for r in ref)
        good = diff <= tol * scale
        ok &= good
        rows.append(f"| {backend} | {dtype} | {diff:.2e} (of {scale:.2e}) | {'ok' if good else 'FAILED'} |")
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-block ViT on 32x32 inputs: the logic in seconds")
    p.add_argument(
        "--model", default=None, help="timm model (default: deit_small_patch16_224; tiny: vit_tiny)"
    )
    p.add_argument("--r", type=int, default=None, help="default 16 (tiny: 4)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 32 256 (tiny: 1 4)")
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests use 'eager')")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--train-batch", type=int, default=None, help="default 32 (tiny: 4)")
    p.add_argument(
        "--budget", type=float, default=240, help="seconds for the throughput table; the rest skipped"
    )
    args = p.parse_args(argv)
    args.model = args.model or ("vit_tiny_patch16_224" if args.tiny else "deit_small_patch16_224")
    args.r = args.r if args.r is not None else (4 if args.tiny else 16)
    args.batches = args.batches or ([1, 4] if args.tiny else [1, 32, 256])
    args.train_batch = args.train_batch or (4 if args.tiny else 32)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device: run with --device cpu --tiny to check the logic")
    start = time.monotonic()
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"# GPU check: {args.model}, {where}, torch {torch.__version__}")
    print("\n## Throughput (random init, eval, median after warm-up)\n")
    print("\n".join(throughput(args, start + args.budget)))
    rows, ok_soft = soft_step(args)
    print("\n## DTEM soft training step\n\n" + "\n".join(rows))
    rows, ok_sdpa = sdpa_backends(args)
    print("\n## Fused attention backward with the proportional-attention mask\n\n" + "\n".join(rows))
    print(f"\n{time.monotonic() - start:.0f} s in all")
    return 0 if ok_soft and ok_sdpa else 1


if __name__ == "__main__":
    sys.exit(main())
