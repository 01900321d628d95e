"""Images/s of a timm ViT with every merging policy at several r, side by side in one run.

Usage: python experiments/throughput.py [--model deit_small_patch16_224] [--batch 32] [--r 0 8 13 16]
       [--policies NoMerge ToMe DTEMHard PiToMe ToFu] [--tiny]
Random-init weights (speed does not depend on them); eval mode; warm-up discarded. Configurations are timed
round-robin (one forward of each per round) so that a change in machine load hits all of them alike; the table
reports the median over rounds and the share of time spent choosing and applying merges.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch

from dtem_lightning import apply_policy
from dtem_lightning import policy as policies
from dtem_lightning.merge import token_counts
from dtem_lightning.policy import MergePolicy, NoMerge

POLICIES = ["NoMerge", "ToMe", "DTEMHard", "PiToMe", "ToFu"]
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)  # --tiny: seconds on a CPU (tests)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def elapsed(fn: Callable[[], object], device: str) -> tuple[float, object]:
    """Seconds ``fn()`` takes on ``device`` (synchronised before and after), and its result."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def timed(fn: Callable, clock: list[float], device: str) -> Callable:
    """Wrap ``fn`` so the seconds spent in it accumulate in ``clock[0]``."""

    def wrapper(*args: object, **kwargs: object) -> object:
        dt, out = elapsed(lambda: fn(*args, **kwargs), device)
        clock[0] += dt
        return out

    return wrapper


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--r", type=int, nargs="+", default=[0, 8, 13, 16])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--eager", action="store_true", help="use eager attention instead of fused SDPA")
    p.add_argument("--policies", nargs="+", default=POLICIES, choices=POLICIES)
    p.add_argument("--tiny", action="store_true", help="a 2-block ViT on 32x32 inputs (tests the script)")
    args = p.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    kwargs = TINY if args.tiny else {}
    side = kwargs.get("img_size", 224)
    x = torch.randn(args.batch, 3, side, side, device=args.device, dtype=dtype)
    configs: list[tuple[str, int, torch.nn.Module, MergePolicy, list[float]]] = []
    for name in args.policies:
        cls = getattr(policies, name)
        torch.manual_seed(0)
        model = timm.create_model(args.model, **kwargs).eval()
        policy = cls()
        apply_policy(model, policy)
        model.to(args.device, dtype), policy.to(args.device, dtype)
        for blk in model.blocks:
            blk.attn.fused_attn = not args.eager
        merge_clock = [0.0]
        # Time spent on the metric (embedding GEMM / key average) and the matching + merge itself.
        policy.merge = timed(policy.merge, merge_clock, args.device)
        policy.metric = timed(policy.metric, merge_clock, args.device)
        for r in args.r if cls is not NoMerge else [0]:
            configs.append((cls.__name__, r, model, policy, merge_clock))

    times: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    merge_share: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    with torch.inference_mode():
        for rnd in range(args.warmup + args.runs):
            for i, (_, r, model, policy, clock) in enumerate(configs):
                with policy.reduce(r):
                    clock[0] = 0.0
                    dt, _ = elapsed(lambda: model(x), args.device)  # noqa: B023 - called at once
                if rnd >= args.warmup:
                    times[i].append(dt)
                    merge_share[i].append(clock[0] / dt)

    n0 = configs[0][2].patch_embed.num_patches + configs[0][2].num_prefix_tokens
    prefix, depth = configs[0][2].num_prefix_tokens, len(configs[0][2].blocks)
    base = args.batch / statistics.median(times[0])
    print(
        f"# {args.model}, batch {args.batch}, {args.dtype}, {args.device}, "
        f"{'eager' if args.eager else 'fused'} attention, {torch.get_num_threads()} threads, "
        f"median of {args.runs} round-robin runs after {args.warmup} warm-up"
    )
    print(
        "| policy | r | tokens | img/s | speed-up vs r=0 | merge share of time |\n|---|---|---|---|---|---|"
    )
    for i, (name, r, *_rest) in enumerate(configs):
        ips = args.batch / statistics.median(times[i])
        tokens = token_counts(n0, prefix, [r] * depth)[-1]
        share = statistics.median(merge_share[i]) * 100
        print(f"| {name} | {r} | {tokens} | {ips:.1f} | {ips / base:.2f}x | {share:.1f} % |")


if __name__ == "__main__":
    main()
