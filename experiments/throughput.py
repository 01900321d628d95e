"""Images/s of a timm ViT with NoMerge / ToMe / DTEMHard at several r, side by side in one run.

Usage: python experiments/throughput.py [--model deit_small_patch16_224] [--batch 32] [--r 0 8 13 16]
Random-init weights (speed does not depend on them); eval mode; warm-up discarded; median of --runs timings.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from dtem_lightning import DTEMHard, NoMerge, ToMe, apply_policy
from dtem_lightning.merge import token_counts


def images_per_second(model: torch.nn.Module, x: torch.Tensor, runs: int, warmup: int) -> float:
    """Median images/s over ``runs`` timed forwards after ``warmup`` untimed ones."""
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return x.shape[0] / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--r", type=int, nargs="+", default=[0, 8, 13, 16])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--eager", action="store_true", help="use eager attention instead of fused SDPA")
    args = p.parse_args()

    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.batch, 3, 224, 224, device=args.device, dtype=dtype)
    rows = []
    for cls in (NoMerge, ToMe, DTEMHard):
        torch.manual_seed(0)
        model = timm.create_model(args.model).eval()
        policy = cls()
        apply_policy(model, policy)
        model.to(args.device, dtype), policy.to(args.device, dtype)
        for blk in model.blocks:
            blk.attn.fused_attn = not args.eager
        for r in args.r if cls is not NoMerge else [0]:
            with policy.reduce(r):
                ips = images_per_second(model, x, args.runs, args.warmup)
            tokens = token_counts(
                model.patch_embed.num_patches + model.num_prefix_tokens,
                model.num_prefix_tokens,
                [r] * len(model.blocks),
            )[-1]
            rows.append((cls.__name__, r, tokens, ips))

    base = rows[0][3]
    print(
        f"# {args.model}, batch {args.batch}, {args.dtype}, {args.device}, "
        f"{'eager' if args.eager else 'fused'} attention, threads {torch.get_num_threads()}"
    )
    print("| policy | r | tokens | img/s | speed-up vs r=0 |\n|---|---|---|---|---|")
    for name, r, tokens, ips in rows:
        print(f"| {name} | {r} | {tokens} | {ips:.1f} | {ips / base:.2f}x |")


if __name__ == "__main__":
    main()
