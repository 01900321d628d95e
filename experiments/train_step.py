"""Time and peak memory of one training step (forward, backward, AdamW) of DTEM's soft step against a NoMerge
end-to-end step, side by side in one run (issue 21).

Usage: python experiments/train_step.py [--model deit_small_patch16_224] [--batch 16 32] [--r 16] [--runs 5]
       [--configs nomerge_e2e tome_e2e dtem_modular dtem_e2e] [--device cpu] [--tiny]

Random-init weights, fp32, a fixed random batch. Times: configurations timed round-robin (one step of each per
round, so a change in machine load hits all alike), median over rounds. Peak memory: on CUDA the allocator's peak
during the steps; on CPU each configuration runs alone in a fresh process and reports its peak resident memory
(``VmHWM``) and the part of it the steps added on top of the model and the batch ("step").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from dtem_lightning import DTEMSoft, NoMerge, ToMe, apply_policy

sys.path.insert(0, str(Path(__file__).parent))
from throughput import TINY, elapsed  # noqa: E402

# name -> (policy class, what trains): "all" (end to end) or "policy" (DTEM's modular regime)
CONFIGS = {
    "nomerge_e2e": (NoMerge, "all"),
    "tome_e2e": (ToMe, "all"),
    "dtem_modular": (DTEMSoft, "policy"),
    "dtem_e2e": (DTEMSoft, "all"),
}


def build(args: argparse.Namespace, name: str, batch: int) -> tuple:
    """Model, optimizer and a batch of configuration ``name``; the merging policy in its training mode."""
    cls, trains = CONFIGS[name]
    torch.manual_seed(0)
    model = timm.create_model(args.model, **(TINY if args.tiny else {})).to(args.device).train()
    policy = cls(r=0 if cls is NoMerge else args.r)
    apply_policy(model, policy)
    policy.to(args.device)
    if trains == "policy":
        model.requires_grad_(False)  # the frozen backbone of the modular regime
    params = list(policy.parameters()) + ([] if trains == "policy" else list(model.parameters()))
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    side = TINY["img_size"] if args.tiny else 224
    x = torch.randn(batch, 3, side, side, generator=g).to(args.device)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(args.device)
    return model, opt, x, y


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def proc_status_mib(field: str) -> float:
    """A memory field of /proc/self/status in MiB (Linux): ``VmRSS`` now, ``VmHWM`` its peak. Not ``ru_maxrss``:
    that one survives fork and exec, so a child started by a big parent reports the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory(args: argparse.Namespace, name: str, batch: int) -> dict[str, float]:
    """Peak memory (MiB) of ``args.runs`` steps of one configuration: ``peak`` in all, ``step`` above what the model
    and batch held before the first step. CUDA: the allocator's counters; CPU: this process's resident memory (so
    call it in a process of its own)."""
    model, opt, x, y = build(args, name, batch)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.runs):
            step(model, opt, x, y)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak": peak / 2**20, "step": (peak - before) / 2**20}
    before = proc_status_mib("VmRSS")
    for _ in range(args.runs):
        step(model, opt, x, y)
    peak = proc_status_mib("VmHWM")
    return {"peak": peak, "step": peak - before}


def memory_in_child(args: argparse.Namespace, name: str, batch: int) -> dict[str, float]:
    """:func:`peak_memory` of one configuration in a fresh Python process (CPU: the peak is per process)."""
    # two steps: the first allocates the optimizer state, the second shows the steady state
    cmd = [sys.executable, __file__, "--model", args.model, "--r", str(args.r), "--runs", "2"]
    cmd += ["--device", args.device, "--child", name, "--batch", str(batch)] + (
        ["--tiny"] if args.tiny else []
    )
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a 2-block ViT on 32x32 inputs (tests the script)")
    p.add_argument("--no-memory", action="store_true", help="times only (repeat runs for ranges)")
    p.add_argument(
        "--child", help=argparse.SUPPRESS
    )  # internal: measure one configuration's memory, print JSON
    args = p.parse_args(argv)
    # the reference of both ratios first, once
    args.configs = ["nomerge_e2e", *(c for c in dict.fromkeys(args.configs) if c != "nomerge_e2e")]
    if args.child:
        print(json.dumps(peak_memory(args, args.child, args.batch[0])))
        return
    memory = "allocator peak" if args.device.startswith("cuda") else "peak RSS, one process per row"
    print(
        f"# {'tiny ViT' if args.tiny else args.model}, r = {args.r}, fp32, {args.device}, "
        f"{torch.get_num_threads()} threads, AdamW; time: median of {args.runs} round-robin steps after "
        f"{args.warmup} warm-up; memory: {memory}"
    )
    print(
        "| batch | config | trains | s/step | vs NoMerge e2e | peak MiB | step MiB | step memory vs NoMerge e2e |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for batch in args.batch:
        built = {name: build(args, name, batch) for name in args.configs}
        times: dict[str, list[float]] = {name: [] for name in args.configs}
        for rnd in range(args.warmup + args.runs):
            for name, parts in built.items():
                dt, _ = elapsed(lambda: step(*parts), args.device)  # noqa: B023 - called at once
                if rnd >= args.warmup:
                    times[name].append(dt)
        del built
        if args.no_memory:
            mem = {name: {"peak": float("nan"), "step": float("nan")} for name in args.configs}
        elif args.device.startswith("cuda"):
            mem = {name: peak_memory(args, name, batch) for name in args.configs}
        else:
            mem = {name: memory_in_child(args, name, batch) for name in args.configs}
        ref_t, ref_m = statistics.median(times["nomerge_e2e"]), mem["nomerge_e2e"]["step"]
        for name in args.configs:
            t = statistics.median(times[name])
            print(
                f"| {batch} | {name} | {CONFIGS[name][1]} | {t:.3f} | {t / ref_t:.2f}x | {mem[name]['peak']:.0f} | "
                f"{mem[name]['step']:.0f} | {mem[name]['step'] / ref_m:.2f}x |"
            )


if __name__ == "__main__":
    main()
