"""experiments/gpu_check.py runs its whole logic on CPU with --tiny (issue 21): the device run only adds speed."""

from __future__ import annotations

import sys

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
