"""The seam between tasks and the merging ViT (issue 18): checkpoint keys, the encoder's output, the import graph."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import timm
import torch

from dtem_lightning import DTEMHard, DTEMSoft, NoMerge, ToMe
from dtem_lightning.encoder import MergingEncoder
from dtem_lightning.tasks import SegmentationTask

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dtem_lightning"


def test_committed_segmentation_checkpoint_loads_strictly():
    """The committed task checkpoint (written before the encoder existed) has exactly the task's keys."""
    ckpt = torch.load(ROOT / "checkpoints/camvid_seg_vit.ckpt", map_location="cpu", weights_only=True)
    hp = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    for k in ("policy", "test_policies", "optimizer", "lr_scheduler"):
        hp.pop(k)
    task = SegmentationTask(policy=NoMerge(), test_policies=[ToMe(), DTEMHard()], **hp)
    assert list(task.state_dict()) == list(ckpt["state_dict"])
    task.load_state_dict(ckpt["state_dict"], strict=True)
    # The encoder's parts are the task's parts: one set of weights.
    assert task.encoder.backbone is task.backbone and task.encoder.policy is task.policy
    assert task.encoder.test_policies is task.test_policies


def test_encoder_output_matches_the_backbone():
    """Encoded tokens are timm's forward_features; sizes and sources follow the policy; patch_grid unmerges."""
    kw = dict(patch_size=4, depth=3, embed_dim=32, num_heads=2, img_size=32, num_classes=0)
    torch.manual_seed(0)
    plain = timm.create_model("vit_tiny_patch16_224", **kw).eval()
    enc = MergingEncoder(timm.create_model("vit_tiny_patch16_224", **kw), ToMe(r=8)).eval()
    enc.backbone.load_state_dict(plain.state_dict())
    enc.add_policies([NoMerge()])
    enc.trace_sources()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = enc(x)
        assert out.tokens.shape == (2, 65 - 24, 32) and out.size.shape == (2, 41, 1)
        assert out.source.shape == (2, 41, 65) and enc.last_token_counts == [57, 49, 41]
        assert out.patch_grid().shape == (2, 64, 32)
        with enc.running(enc.test_policies[0], 0):
            same = enc(x)
        assert same.size is None and torch.equal(same.tokens, plain.forward_features(x))
        assert torch.equal(same.patch_grid(), same.tokens[:, 1:])
    assert enc.active is enc.policy  # the own policy is back after the sweep row
    assert enc.schedule("8,4,0") == [8, 4, 0] and enc.schedule(2) == [2, 2, 2]


def _imports(path: Path) -> set[str]:
    """dtem_lightning modules ``path`` imports (``from dtem_lightning import merge`` counts as ``merge``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dtem_lightning"):
            mod = node.module.removeprefix("dtem_lightning").lstrip(".")
            subs = [f"{mod}.{a.name}".lstrip(".") for a in node.names]
            hits = [s for s in subs if (PACKAGE / f"{s.replace('.', '/')}.py").exists()]
            found.update(hits or [mod])
        elif isinstance(node, ast.Import):
            found.update(
                a.name.removeprefix("dtem_lightning.") for a in node.names if "dtem_lightning" in a.name
            )
    return found


@pytest.mark.parametrize("task", sorted(p.stem for p in (PACKAGE / "tasks").glob("*.py")))
def test_tasks_reach_the_merging_vit_only_through_the_encoder(task):
    imported = _imports(PACKAGE / "tasks" / f"{task}.py")
    assert not imported & {"patch", "merge"}, f"tasks/{task}.py imports {imported & {'patch', 'merge'}}"
    assert ".state." not in (PACKAGE / "tasks" / f"{task}.py").read_text()  # no policy.state reads


def test_layers_import_only_downwards():
    """tasks -> encoder -> patch (the timm backend) -> policy -> merge; nothing below imports anything above."""
    layers = ["merge", "policy", "patch", "encoder"]
    for i, name in enumerate(layers):
        above = set(layers[i + 1 :]) | {"tasks", "cli"}
        bad = {m for m in _imports(PACKAGE / f"{name}.py") if m.split(".")[0] in above}
        assert not bad, f"{name}.py imports {bad} from above it"


NEUTRAL = (
    "optim",
    "flops",
    "stats",
    "io",
    "text",
)  # shared helpers: they import no other module of the package
TASK_PARTS = ("sweep", "intervals", "predict", "decoders")  # what BaseTask and the tasks are built from


def test_neutral_modules_and_task_parts_import_nothing_above():
    """Neutral modules import no package module; BaseTask's parts import neither BaseTask nor a task; nothing
    outside tasks/ (but the CLI) imports tasks."""
    for name in NEUTRAL:
        assert not _imports(PACKAGE / f"{name}.py"), f"{name}.py imports {_imports(PACKAGE / f'{name}.py')}"
    tasks = {f"tasks.{p.stem}" for p in (PACKAGE / "tasks").glob("*.py")}
    for part in TASK_PARTS:
        bad = {
            m for m in _imports(PACKAGE / "tasks" / f"{part}.py") if m in tasks or m in {"cli", "callbacks"}
        }
        assert not bad, f"tasks/{part}.py imports {bad} from above it"
    for path in [*PACKAGE.glob("*.py"), *(PACKAGE / "data").glob("*.py")]:
        if path.stem not in {"cli", "__main__"}:
            bad = {m for m in _imports(path) if m.split(".")[0] == "tasks"}
            assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_policies_bind_to_a_plain_description():
    """A policy builds its parameters from a ModelInfo alone; the backend hands it the keys (no policy hooks)."""
    from dtem_lightning.policy import ModelInfo

    soft = DTEMSoft(r=2)
    soft.bind(ModelInfo(depth=3, width=32, num_heads=2, head_dim=16, num_prefix=1))
    assert [tuple(e.weight.shape) for e in soft.embed] == [(16, 32)] * 3 and soft.schedule == [2, 2, 2]
    with pytest.raises(TypeError, match="ModelInfo"):
        ToMe().bind(torch.nn.Linear(2, 2))
    imported = {
        a.name.split(".")[0]
        for node in ast.walk(ast.parse((PACKAGE / "policy.py").read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for a in ([ast.alias(node.module)] if isinstance(node, ast.ImportFrom) else node.names)
        if a.name
    }
    assert "timm" not in imported, imported

    kw = dict(patch_size=4, depth=2, embed_dim=32, num_heads=2, img_size=32, num_classes=0)
    enc = MergingEncoder(timm.create_model("vit_tiny_patch16_224", **kw), ToMe(r=4))
    enc.add_policies([ToMe(r=2, prop_attn=False), ToMe(r=1, trace_source=True)])
    # One hook per block, the backend's own, however many ToMe policies are bound.
    assert all(len(blk.attn.k_norm._forward_hooks) == 1 for blk in enc.backbone.blocks)
    with torch.no_grad():
        enc(torch.randn(1, 3, 32, 32))
    assert enc.last_token_counts == [61, 57]
    assert all("_merge_keys" not in blk.attn.k_norm.__dict__ for blk in enc.backbone.blocks)  # freed


def test_hard_and_soft_are_modes_of_one_policy():
    """DTEMSoft is DTEMHard in soft mode: same metric, same eval computation with the same weights."""
    assert DTEMHard.mode == "hard" and DTEMSoft.mode == "soft" and issubclass(DTEMSoft, DTEMHard)
    assert DTEMSoft.merge is DTEMHard.merge and DTEMSoft.metric is DTEMHard.metric
