"""experiments/gpu_check.py runs its whole logic on CPU with --tiny (issue 21): the device run only adds speed."""

from __future__ import annotations

import sys

import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
import gpu_check  # noqa: E402


def test_gpu_check_logic_on_cpu(capsys) -> None:
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--compile-backend", "eager", "--runs", "1", "--warmup", "0",
                         "--dtypes", "bfloat16", "--batches", "1", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| bfloat16 |")]
    # dtype x compile x batch x policy, NoMerge first in each setting
    assert [(r[1], r[2], r[3]) for r in rows][:3] == [("1", "False", "NoMerge"), ("1", "False", "ToMe"),
                                                      ("1", "False", "DTEMHard")]  # fmt: skip
    assert len(rows) == 2 * 2 * 3 and {r[2] for r in rows} == {"False", "True"}
    assert "| bf16-mixed |" in out and "| fp32, input rounded to bf16 |" in out
    assert "| MATH | torch.float32 | 0.00e+00" in out and "| FLASH_ATTENTION | torch.float32 |" in out
    assert "FAILED" not in out


def test_train_step_table(capsys) -> None:
    """experiments/train_step.py: every configuration timed against NoMerge end to end, and its peak memory
    measured in a process of its own (the modular step's optimizer holds only the embedding)."""
    import train_step  # noqa: E402

    train_step.main(["--tiny", "--batch", "2", "--r", "4", "--runs", "1", "--warmup", "0"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 |")]
    assert [r[1] for r in rows] == list(train_step.CONFIGS)
    assert [r[2] for r in rows] == ["all", "all", "policy", "all"]
    assert rows[0][4] == "1.00x" and rows[0][7] == "1.00x |"
    assert all(float(r[5]) > 0 and float(r[3]) > 0 for r in rows)  # peak MiB and s/step were measured


def test_train_step_configurations_train_what_they_say() -> None:
    import argparse

    import train_step  # noqa: E402

    args = argparse.Namespace(model="deit_small_patch16_224", tiny=True, device="cpu", r=4)
    for name, (cls, trains) in train_step.CONFIGS.items():
        model, opt, x, y = train_step.build(args, name, 2)
        policy = model.blocks[0]._merge_policy
        assert type(policy) is cls and model.training and x.shape == (2, 3, 32, 32)
        trained = {id(p) for group in opt.param_groups for p in group["params"]}
        want = {id(p) for p in policy.parameters()}
        if trains == "all":
            want |= {id(p) for p in model.parameters()}
        assert trained == want and all(p.requires_grad == (id(p) in want) for p in model.parameters())
        before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
        train_step.step(model, opt, x, y)
        assert any(not torch.equal(a, p) for a, p in zip(before, opt.param_groups[0]["params"]))
