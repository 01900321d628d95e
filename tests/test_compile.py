"""torch.compile of the eval path (issue 21): NoMerge, ToMe and DTEM-hard compile, equal eager, and batches of one
size never recompile (dynamo's own check; the 'eager' backend keeps the test fast: recompilation is decided by
dynamo's guards, before any backend runs)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit

from dtem_lightning import DTEMHard, NoMerge, ToMe, apply_policy


@pytest.mark.parametrize("cls", [NoMerge, ToMe, DTEMHard])
def test_compiled_eval_equals_eager_and_never_recompiles(cls: type) -> None:
    torch._dynamo.reset()
    model = tiny_vit()
    policy = cls(r=8)
    apply_policy(model, policy)
    compiled = torch.compile(model, backend="eager")
    batches = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    with torch.no_grad():
        want = [model(x) for x in batches]
        first = compiled(batches[0])
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = [compiled(x) for x in batches[1:]]
    for a, b in zip([first, *got], want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1.3e-6)
    assert policy.state.tokens == ([65] * 4 if cls is NoMerge else [57, 49, 41, 33])
