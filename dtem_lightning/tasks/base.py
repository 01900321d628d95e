"""BaseTask: a timm ViT backbone with a merge policy, injected optimizer, and the r-sweep as the test loop."""

from __future__ import annotations

import inspect
import math
import os
import pickle
import random
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import timm
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn
from torchmetrics import MetricCollection

from dtem_lightning import flops
from dtem_lightning import merge as M
from dtem_lightning.patch import apply_policy, num_tokens, use_policy
from dtem_lightning.policy import MergePolicy, NoMerge


class CosineLR(torch.optim.lr_scheduler.LambdaLR):
    """Per-step cosine decay from the base lr to ``min_lr`` after optional linear warm-up.

    Args:
        optimizer: the optimizer.
        total_steps: steps of the whole run; None lets the task fill in ``trainer.estimated_stepping_batches``.
        warmup_steps: linear warm-up steps from 0.
        min_lr: final learning rate.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        min_lr: float = 0.0,
    ) -> None:
        self.total_steps, self.warmup_steps, self.min_lr = total_steps, warmup_steps, min_lr
        base = [g["lr"] for g in optimizer.param_groups]
        lambdas = [lambda step, b=b: self._factor(step, b) for b in base]
        super().__init__(optimizer, lambdas)

    def _factor(self, step: int, base_lr: float) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        total = max(1, (self.total_steps or 1) - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / total)
        floor = self.min_lr / base_lr if base_lr > 0 else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def _head_rows(path: str | Path) -> int | None:
    """Classes of the classifier head (``head.weight``) stored in a weights file, if any."""
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return f.get_slice("head.weight").get_shape()[0] if "head.weight" in f.keys() else None
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else {}
    head = state.get("head.weight")
    return int(head.shape[0]) if head is not None else None


def _weights_only_copy(path: str | Path) -> Path:
    """Re-save a trusted pickled checkpoint's tensors to a temporary file that loads with weights_only=True."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    out = Path(tempfile.mkdtemp(prefix="dtem_weights_")) / Path(path).with_suffix(".pth").name
    torch.save(tensors, out)
    return out


def policy_label(policy: MergePolicy, trained: bool) -> str:
    """Row name of a policy in sweep tables: its class, marked "(untrained)" for a fresh learnable one."""
    name = type(policy).__name__
    has_params = any(True for _ in policy.parameters())
    return f"{name} (untrained)" if has_params and not trained else name


def policy_config(policy: MergePolicy) -> tuple[type, tuple[tuple[str, Any], ...]] | None:
    """(class, init arguments but ``r``) of a policy: what its sweep rows compute.

    ``r`` is left out because the sweep runs every policy at each ``test_r``. Arguments are read back from the
    attributes of the same name; None when one is not readable, and such a policy is never taken for a duplicate.
    """
    params = list(inspect.signature(type(policy).__init__).parameters.values())[1:]
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    missing = object()
    args = tuple((p.name, getattr(policy, p.name, missing)) for p in params if p.name != "r")
    return None if any(v is missing for _, v in args) else (type(policy), args)


class BaseTask(L.LightningModule):
    """Common machinery of all tasks; a subclass implements :meth:`build_head` extras and :meth:`step`.

    Args:
        backbone: timm model name of the ViT.
        policy: merge policy applied to the backbone (NoMerge when omitted).
        pretrained: load the timm hub weights (needs network access).
        checkpoint_path: local weights file (timm/PyTorch state dict or safetensors) for the backbone.
        backbone_kwargs: extra arguments of ``timm.create_model`` (e.g. depth, drop_path_rate).
        img_size: input size (linked from the data module); None keeps the backbone's.
        freeze_backbone: True is DTEM's modular regime (only the policy trains), False is end-to-end.
        optimizer: optimizer factory (from the config).
        lr_scheduler: scheduler factory; :class:`CosineLR` gets its total steps from the trainer.
        no_weight_decay_1d: put biases, norms and other 1-D parameters in a group without weight decay.
        test_r: reduction rates evaluated by the test loop, each with its own metrics: ints (every block) or
            per-block schedules, as lists (``[[8, 8, 4, 0], 16]``) or strings (``"8,8,4,0"``, the form of
            ``experiments/headroom.py --r``); default: the policy's own r (its whole schedule).
        test_policies: further policies evaluated in the same test pass (e.g. NoMerge, ToMe, an untrained
            DTEMHard control row); each is bound to the same backbone. An entry that repeats the task's own
            policy or an earlier entry (same class, same init arguments but r, same row label) would write the
            same rows twice: it is dropped with a warning. A DTEMHard control next to a DTEM policy is kept:
            it is the untrained control.
        trust_checkpoint: allow a ``checkpoint_path`` file that needs arbitrary pickled code to load (only
            for files you trust); by default such a file is refused.
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        policy: MergePolicy | None = None,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        img_size: int | None = None,
        freeze_backbone: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        no_weight_decay_1d: bool = True,
        # int | str | list in this order: jsonargparse then appends "8,4" (test_r+=8,4) as a string
        test_r: list[int | str | list] | None = None,
        test_policies: list[MergePolicy] | None = None,
        trust_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        # Under LightningCLI the hyper-parameters are the config (class paths for components); from Python,
        # component objects are left out so checkpoints stay loadable with weights_only=True.
        from_cli = _given_hyperparameters.get() is not None
        self.save_hyperparameters(
            ignore=[] if from_cli else ["policy", "optimizer", "lr_scheduler", "test_policies"]
        )
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.backbone = self.create_backbone()
        patch, img = self.backbone.patch_embed.patch_size, self.backbone.patch_embed.img_size
        if img is not None and (img[0] % patch[0] or img[1] % patch[1]):
            raise ValueError(f"image size {tuple(img)} is not divisible by the patch size {tuple(patch)}")
        self.policy = policy if policy is not None else NoMerge()
        apply_policy(self.backbone, self.policy)
        # Duplicates go before binding: a bound ToMe would keep reading keys through its hooks.
        self.test_policies = nn.ModuleList(self._without_duplicates(list(test_policies or [])))
        for p in self.test_policies:
            p.bind(self.backbone)
        use_policy(self.backbone, self.policy)
        # The policy's own r, schedule included: ToMe(r=[8, 4, 0, 0]) is swept as that schedule.
        self.test_r = [self._check_r(r) for r in (test_r if test_r is not None else [self.policy.r])]
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.sweep_results: list[dict[str, Any]] = []
        self._input_size: tuple[int, int, int] | None = None

    def _check_r(self, r: int | list[int] | str) -> int | list[int]:
        """One ``test_r`` entry parsed and checked against the backbone's depth (errors name the entry)."""
        try:
            r = M.parse_r(r)
            M.r_schedule(r, self.policy.depth)
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad test_r entry {r!r}: {e}") from None
        return r

    def _without_duplicates(self, test_policies: list[MergePolicy]) -> list[MergePolicy]:
        """``test_policies`` minus entries whose rows the task's own policy or an earlier entry already writes."""
        own = (policy_label(self.policy, trained=True), policy_config(self.policy))
        seen = [(own, "the task's own policy")]
        kept = []
        for i, p in enumerate(test_policies):
            ident = (policy_label(p, trained=False), policy_config(p))
            twin = next((where for known, where in seen if ident[1] is not None and known == ident), None)
            if twin is not None:
                warnings.warn(
                    f"test_policies[{i}] {type(p).__name__}({p.extra_repr()}) repeats {twin}: dropped (its rows "
                    "would be written twice)",
                    stacklevel=3,
                )
                continue
            seen.append((ident, f"test_policies[{i}]"))
            kept.append(p)
        return kept

    # ------------------------------------------------------------------ model
    def backbone_create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``timm.create_model``; subclasses add theirs (e.g. num_classes)."""
        kwargs = dict(self.hparams.backbone_kwargs or {})
        if self.hparams.img_size is not None:
            kwargs["img_size"] = self.hparams.img_size
        return kwargs

    def create_backbone(self) -> nn.Module:
        """Create the timm model, from the hub or a local weights file; nothing downloads unless asked."""
        name, kwargs = self.hparams.backbone, self.backbone_create_kwargs()
        if not timm.is_model(name):
            raise ValueError(f"unknown backbone {name!r}: not a timm model name (see timm.list_models())")
        path = self.hparams.checkpoint_path
        if path is not None:
            if not Path(path).is_file():
                raise FileNotFoundError(f"checkpoint_path {path!r} does not exist")
            try:
                rows = _head_rows(path)
            except pickle.UnpicklingError as e:
                if not self.hparams.trust_checkpoint:
                    raise ValueError(
                        f"refusing to load {path}: it needs arbitrary pickled code, not just tensors. If you trust "
                        "the file, set --model.init_args.trust_checkpoint=true (or re-save it as safetensors)"
                    ) from e
                path = _weights_only_copy(path)
                rows = _head_rows(path)
            overlay = {"file": str(path), "hf_hub_id": None, "url": None}
            if rows is not None:  # timm keeps the file's head only when its class count matches the model's
                overlay["num_classes"] = rows
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        if self.hparams.pretrained:
            try:
                return timm.create_model(name, pretrained=True, **kwargs)
            except Exception as e:  # network errors come in many types
                raise RuntimeError(
                    f"could not load pretrained weights of {name!r} ({type(e).__name__}: {e}). Without network "
                    "access, download them elsewhere and pass --model.init_args.checkpoint_path=/path/to/file"
                ) from e
        return timm.create_model(name, pretrained=False, **kwargs)

    def policies(self) -> list[tuple[str, MergePolicy]]:
        """(label, policy) pairs evaluated by the test loop: the task's own policy first."""
        pairs = [(policy_label(self.policy, trained=True), self.policy)]
        return pairs + [(policy_label(p, trained=False), p) for p in self.test_policies]

    def sweep(self) -> list[tuple[int, str, MergePolicy, int | list[int]]]:
        """(index, label, policy, r) of every test-loop evaluation (r: constant or schedule); NoMerge once."""
        out = []
        for i, (label, p) in enumerate(self.policies()):
            for r in [0] if isinstance(p, NoMerge) else self.test_r:
                out.append((i, label, p, r))
        return out

    @staticmethod
    def sweep_key(i: int, r: int | list[int]) -> str:
        """Name of the metric collection of policy ``i`` at ``r`` (key-safe also for schedules)."""
        return f"p{i}_r{M.r_key(r)}"

    # ------------------------------------------------------------------ hooks for subclasses
    def metrics(self) -> MetricCollection:
        """A fresh metric collection (one per stage and per swept r)."""
        raise NotImplementedError

    def step(self, batch: Any) -> tuple[Tensor, Any, Any]:
        """Loss, predictions and targets of one evaluation batch."""
        raise NotImplementedError

    def training_loss(self, batch: Any) -> Tensor:
        """Loss of one training batch (defaults to :meth:`step`'s)."""
        return self.step(batch)[0]

    def evaluate(self, batch: Any) -> tuple[Any, Any]:
        """Predictions and targets of one test batch for the sweep's metrics (defaults to :meth:`step`'s)."""
        return self.step(batch)[1:]

    def gmacs(self, input_size: tuple[int, int, int]) -> float:
        """GMACs per image of the current model (backbone and policy; subclasses add their heads)."""
        return flops.gmacs(self.backbone, input_size)

    def input_size_of(self, batch: Any) -> tuple[int, int, int]:
        """(C, H, W) of the images in ``batch``."""
        return tuple(batch[0].shape[1:])

    def input_size_for_flops(self, trainer: L.Trainer) -> tuple[int, int, int]:
        """(C, H, W) the data module produces, else the backbone's own input size."""
        size = getattr(trainer.datamodule, "input_size", None)
        return tuple(size) if size else (3, *self.backbone.patch_embed.img_size)

    def num_input_tokens(self, input_size: tuple[int, int, int]) -> int:
        """Tokens entering block 0 for images of ``input_size``."""
        return num_tokens(self.backbone, tuple(input_size[1:]))

    # ------------------------------------------------------------------ Lightning
    def setup(self, stage: str) -> None:
        self.val_metrics = self.metrics().to(self.device)
        self.test_metrics = nn.ModuleDict(
            {self.sweep_key(i, r): self.metrics() for i, _, _, r in self.sweep()}
        ).to(self.device)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        # Randomness of a step (mixup, drop-path) depends on (seed, step, rank) only, so a resumed run
        # repeats exactly what an uninterrupted one does.
        step_seed = (
            int(os.environ.get("PL_GLOBAL_SEED", "0")) * 1_000_003 + self.global_step
        ) * 97 + self.global_rank
        torch.manual_seed(step_seed)
        np.random.seed(step_seed % 2**32)
        random.seed(step_seed)
        loss = self.training_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}); the last checkpoint is kept"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=self.batch_size_of(batch))
        if self.policy.state.tokens:
            self.log(
                "train/tokens", float(self.policy.state.tokens[-1]), batch_size=self.batch_size_of(batch)
            )
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, preds, target = self.step(batch)
        self.val_metrics.update(preds, target)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=self.batch_size_of(batch))

    def on_validation_epoch_end(self) -> None:
        for k, v in self.val_metrics.compute().items():
            if v.numel() == 1:  # vector metrics (e.g. per-class IoU) are not logged; subclasses may read them
                self.log(f"val/{k}", v, prog_bar=True)
        self.val_metrics.reset()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        if self._input_size is None:
            self._input_size = self.input_size_of(batch)
        for i, _, policy, r in self.sweep():
            with self.running(policy, r):
                preds, target = self.evaluate(batch)
            self.test_metrics[self.sweep_key(i, r)].update(preds, target)

    def on_test_epoch_end(self) -> None:
        self.sweep_results = []
        for i, label, policy, r in self.sweep():
            key = self.sweep_key(i, r)
            computed = self.test_metrics[key].compute()
            values = {k: float(v) for k, v in computed.items() if v.numel() == 1}  # scalar columns only
            self.test_metrics[key].reset()
            gf, tokens = float("nan"), -1  # no test batch seen: nothing to size the model with
            if self._input_size is not None:
                with self.running(policy, r):
                    gf = self.gmacs(self._input_size)
                    tokens = policy.token_counts(self.num_input_tokens(self._input_size))[-1]
            prefix = "test" if i == 0 else f"test/{label}"
            for k, v in {**values, "gflops": gf}.items():
                self.log(f"{prefix}/{k}/r{M.r_key(r)}", v, sync_dist=False, rank_zero_only=True)
            row = {"policy": label, "r": M.r_label(r), "gflops": gf, "tokens": tokens, **values}
            self.sweep_results.append(row)

    @contextmanager
    def running(self, policy: MergePolicy, r: int | list[int]) -> Iterator[None]:
        """Run the backbone with ``policy`` at reduction ``r`` (constant or schedule); own policy back afterwards."""
        use_policy(self.backbone, policy)
        try:
            with policy.reduce(r):
                yield
        finally:
            use_policy(self.backbone, self.policy)

    def batch_size_of(self, batch: Any) -> int:
        return len(batch[0])

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for p in self.parameters():
            if not p.requires_grad:
                continue
            (no_decay if self.hparams.no_weight_decay_1d and p.ndim <= 1 else decay).append(p)
        if not decay and not no_decay:
            raise ValueError("nothing to train: the backbone is frozen and the policy has no parameters")
        groups = [{"params": decay}] + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])
        optimizer = self.optimizer(groups)
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        if isinstance(scheduler, CosineLR) and scheduler.total_steps is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Let a checkpoint trained with one policy be tested with another.

        Policy weights the current policies do not have are dropped, and policy weights they need but the
        checkpoint lacks keep their initialisation; each case prints one line.
        """
        state = checkpoint.get("state_dict", {})
        own = self.state_dict()
        policy_keys = ("policy.", "test_policies.")
        extra = [k for k in state if k.startswith(policy_keys) and k not in own]
        missing = [k for k in own if k.startswith(policy_keys) and k not in state]
        for k in extra:
            del state[k]
        for k in missing:
            state[k] = own[k]
        if extra:
            warnings.warn(
                f"checkpoint policy weights unused by {type(self.policy).__name__}: {len(extra)} tensors "
                f"ignored ({extra[0]}, ...)",
                stacklevel=2,
            )
        if any(k.startswith("policy.") for k in missing):
            warnings.warn(
                f"checkpoint has no weights for {type(self.policy).__name__}: its parameters keep "
                "their initialisation",
                stacklevel=2,
            )
