"""BaseTask/ClassificationTask pieces: optimizer groups, cosine schedule, mixup, freezing, checkpoint policy swaps."""

from __future__ import annotations

import pytest
import torch

from dtem_lightning import DTEMHard, DTEMSoft, ToMe
from dtem_lightning.tasks import ClassificationTask, CosineLR

TINY = dict(backbone="vit_tiny_patch16_224", img_size=32, num_classes=10,
            backbone_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2))  # fmt: skip


def test_cosine_schedule_endpoints():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = CosineLR(opt, total_steps=10, min_lr=1e-6)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 1.0
    assert lrs[5] == pytest.approx(0.5 * (1 + 1e-6), rel=1e-6)
    assert lrs[10] == pytest.approx(1e-6)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    warm = CosineLR(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), total_steps=10, warmup_steps=4
    )
    assert warm.get_last_lr()[0] == pytest.approx(0.25)


def test_modular_freezes_backbone_and_groups_weight_decay():
    task = ClassificationTask(policy=DTEMSoft(r=4), freeze_backbone=True, **TINY)
    trainable = [n for n, p in task.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("policy.") for n in trainable)
    opt = task.configure_optimizers()
    decay, no_decay = opt.param_groups
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="nothing to train"):
        ClassificationTask(policy=ToMe(r=4), freeze_backbone=True, **TINY).configure_optimizers()


def test_mixup_loss_and_odd_batch():
    task = ClassificationTask(policy=DTEMSoft(r=4), mixup=0.8, cutmix=1.0, **TINY).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = task.training_loss((x, y))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert task.policy.embed[0].weight.grad is not None
    with pytest.raises(ValueError, match="even batch size, got 3"):
        task.training_loss((x[:3], y[:3]))


def test_checkpoint_with_other_policy_loads_with_note():
    trained = ClassificationTask(policy=DTEMSoft(r=4), **TINY)
    state = {"state_dict": trained.state_dict()}
    tome = ClassificationTask(policy=ToMe(r=4), **TINY)
    with pytest.warns(UserWarning, match="unused by ToMe"):
        tome.on_load_checkpoint(state)
    tome.load_state_dict(state["state_dict"])
    dtem = ClassificationTask(policy=DTEMHard(r=4), **TINY)
    with pytest.warns(UserWarning, match="keep their initialisation"):
        dtem.on_load_checkpoint(state2 := {"state_dict": tome.state_dict()})
    dtem.load_state_dict(state2["state_dict"])


def test_task_rejects_bad_values():
    with pytest.raises(ValueError, match="-1"):
        ClassificationTask(test_r=[0, -1], **TINY)
    with pytest.raises(ValueError, match="not_a_model"):
        ClassificationTask(**{**TINY, "backbone": "not_a_model"})
    with pytest.raises(FileNotFoundError, match="/nope.pth"):
        ClassificationTask(checkpoint_path="/nope.pth", **TINY)


def test_local_weights_file_loads(tmp_path):
    from safetensors.torch import save_file

    src = ClassificationTask(**TINY)
    path = tmp_path / "w.safetensors"
    save_file(src.backbone.state_dict(), str(path))
    dst = ClassificationTask(checkpoint_path=str(path), **TINY)
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(v, dst.backbone.state_dict()[k]), k


def test_imagenet_head_is_dropped_for_other_class_count(tmp_path):
    src = ClassificationTask(**{**TINY, "num_classes": 1000})
    path = tmp_path / "w.pth"
    torch.save(src.backbone.state_dict(), path)
    dst = ClassificationTask(checkpoint_path=str(path), **TINY)  # 10 classes: new head, same blocks
    assert dst.backbone.head.weight.shape[0] == 10
    assert torch.equal(dst.backbone.blocks[0].attn.qkv.weight, src.backbone.blocks[0].attn.qkv.weight)


def test_image_size_must_divide_by_patch():
    with pytest.raises(ValueError, match=r"\(30, 30\) is not divisible by the patch size \(4, 4\)"):
        ClassificationTask(**{**TINY, "img_size": 30})


def test_nan_loss_stops_with_step(tmp_path):
    import lightning as L

    from dtem_lightning.data import SyntheticDataModule

    class NaNTask(ClassificationTask):
        def training_loss(self, batch):
            return super().training_loss(batch) * float("nan")

    task = NaNTask(policy=DTEMSoft(r=4), **TINY)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(FloatingPointError, match="non-finite training loss nan at global step 0"):
        trainer.fit(task, SyntheticDataModule(num_samples=16, batch_size=8))


class _Custom:  # a pickled object that weights_only loading refuses
    pass


def test_pickled_checkpoint_refused_unless_trusted(tmp_path):
    src = ClassificationTask(**TINY)
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": src.backbone.state_dict(), "extra": _Custom()}, path)
    with pytest.raises(ValueError, match="refusing to load .*unsafe.pth.*trust_checkpoint=true"):
        ClassificationTask(checkpoint_path=str(path), **TINY)
    dst = ClassificationTask(checkpoint_path=str(path), trust_checkpoint=True, **TINY)
    assert torch.equal(dst.backbone.head.weight, src.backbone.head.weight)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.slow
def test_repeated_sweeps_are_deterministic_and_do_not_grow_memory(tmp_path):
    import gc

    import lightning as L

    from dtem_lightning.data import SyntheticDataModule

    def sweep() -> list[dict]:
        L.seed_everything(7, verbose=False)
        task = ClassificationTask(
            policy=DTEMSoft(r=4), test_r=[0, 4, 8], test_policies=[ToMe(), DTEMHard()], **TINY
        )
        trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
        trainer.test(task, SyntheticDataModule(num_samples=32, batch_size=8), verbose=False)
        return task.sweep_results

    first = sweep()
    assert len(first) == 7 and first == sweep()  # 3 policies x r 4, 8 + NoMerge once; same seed, same numbers
    gc.collect()
    base = _rss_mb()
    for _ in range(10):
        sweep()
    gc.collect()
    assert _rss_mb() <= base * 1.05, (base, _rss_mb())
