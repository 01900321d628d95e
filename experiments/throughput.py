"""Images/s of a timm ViT with every merging policy at several r, side by side in one run, eager and compiled.

Usage: python experiments/throughput.py [--model deit_small_patch16_224] [--batch 32] [--r 0 8 13 16]
       [--policies NoMerge ToMe DTEMHard PiToMe ToFu ATM] [--compile] [--bound] [--tiny]
Random-init weights (speed does not depend on them); eval mode; warm-up discarded. Configurations are timed
round-robin (one forward of each per round) so that a change in machine load hits all of them alike; the table
reports the median over rounds and the share of time spent choosing and applying merges (eager only: timing the
merge inside a compiled graph would break it). ``--compile`` adds a ``torch.compile``d twin of every policy whose
shapes depend on r alone (ATM's token counts depend on the image, so it stays eager), compared with the compiled
NoMerge. ``--bound`` adds the speed-up of a merge that costs nothing (tokens dropped: the ceiling of every policy
at that r). Tokens: what the last forward left (ATM: the image's own count, at most what r allows).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch

from dtem_lightning import apply_policy, merge
from dtem_lightning import policy as policies
from dtem_lightning.policy import MergePolicy, NoMerge

POLICIES = ["NoMerge", "ToMe", "DTEMHard", "PiToMe", "ToFu", "ATM"]
NOT_COMPILED = {"ATM"}  # data-dependent token counts: a recompile per count
BOUND = "Drop (bound)"  # --bound: the row of a merge that costs nothing


class DropTokens(MergePolicy):
    """The speed-up a free merge would give: each block drops its r last tokens (ToMe's counts), with no metric,
    matching, merging or attention bias. Not a policy (it throws information away); the ceiling of the others."""

    def step(
        self, layer: int, x: torch.Tensor, u: torch.Tensor, keys: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x[:, : x.shape[1] - merge.capped_r(self.schedule[layer], x.shape[1] - self.num_prefix)]
        self.state.tokens.append(x.shape[1])
        return x


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
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests: eager)")
    p.add_argument("--bound", action="store_true", help=f"add {BOUND!r}: tokens dropped at no cost (eager)")
    args = p.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    kwargs = TINY if args.tiny else {}
    side = kwargs.get("img_size", 224)
    x = torch.randn(args.batch, 3, side, side, device=args.device, dtype=dtype)
    # (policy name, r, compiled, callable, policy, merge clock)
    configs: list[tuple[str, int, bool, Callable, MergePolicy, list[float]]] = []
    for compiled in (False, True) if args.compile else (False,):
        for name in args.policies + ([BOUND] if args.bound and not compiled else []):
            if compiled and name in NOT_COMPILED:
                continue
            cls = DropTokens if name == BOUND else getattr(policies, name)
            torch.manual_seed(0)
            model = timm.create_model(args.model, **kwargs).eval()
            policy = cls()
            apply_policy(model, policy)
            model.to(args.device, dtype), policy.to(args.device, dtype)
            for blk in model.blocks:
                blk.attn.fused_attn = not args.eager
            merge_clock = [0.0]
            # time spent on the metric (embedding GEMM / key average) and the matching + merge; eager only
            if not compiled:
                policy.merge = timed(policy.merge, merge_clock, args.device)
                policy.metric = timed(policy.metric, merge_clock, args.device)
            fn = torch.compile(model, backend=args.compile_backend) if compiled else model
            for r in args.r if cls is not NoMerge else [0]:
                configs.append((name, r, compiled, fn, policy, merge_clock))

    times: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    merge_share: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    tokens: dict[int, int] = {}
    with torch.inference_mode():
        for rnd in range(args.warmup + args.runs):
            for i, (_, r, _, fn, policy, clock) in enumerate(configs):
                with policy.reduce(r):
                    clock[0] = 0.0
                    dt, _ = elapsed(lambda: fn(x), args.device)  # noqa: B023 - called at once
                tokens[i] = policy.state.tokens[-1]
                if rnd >= args.warmup:
                    times[i].append(dt)
                    merge_share[i].append(clock[0] / dt)

    ips = {i: args.batch / statistics.median(times[i]) for i in times}
    base = {c: next(ips[i] for i, cfg in enumerate(configs) if cfg[2] == c and cfg[0] == "NoMerge")
            for c in {cfg[2] for cfg in configs}}  # fmt: skip
    eager = {(name, r): ips[i] for i, (name, r, c, *_) in enumerate(configs) if not c}
    print(
        f"# {args.model}, batch {args.batch}, {args.dtype}, {args.device}, "
        f"{'eager' if args.eager else 'fused'} attention, {torch.get_num_threads()} threads, "
        f"median of {args.runs} round-robin runs after {args.warmup} warm-up"
        + (f", compile backend {args.compile_backend}" if args.compile else "")
    )
    print(
        "| policy | r | tokens | compiled | img/s | speed-up vs r=0 | merge share of time | vs eager |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for i, (name, r, compiled, *_rest) in enumerate(configs):
        share = "n/a" if compiled else f"{statistics.median(merge_share[i]) * 100:.1f} %"
        print(
            f"| {name} | {r} | {tokens[i]} | {'yes' if compiled else 'no'} | {ips[i]:.1f} | "
            f"{ips[i] / base[compiled]:.2f}x | {share} | {ips[i] / eager[name, r]:.2f}x |"
        )


if __name__ == "__main__":
    main()
