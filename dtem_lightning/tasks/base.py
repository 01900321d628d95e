"""BaseTask: the merging encoder, what trains, the optimizer and Lightning's hooks.

The test loop's r-sweep (:mod:`.sweep`), its paired intervals (:mod:`.intervals`) and predict (:mod:`.predict`) are
mixins in their own modules.
"""

from __future__ import annotations

import os
import pickle
import random
import warnings
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn
from torchmetrics import MetricCollection

from dtem_lightning.encoder import MergingEncoder
from dtem_lightning.optim import CosineLR
from dtem_lightning.policy import MergePolicy, NoMerge
from dtem_lightning.tasks.intervals import IntervalMixin
from dtem_lightning.tasks.predict import PredictMixin
from dtem_lightning.tasks.sweep import SweepMixin, check_same_tensors

TrainMode = Literal["policy", "policy+head", "all"]
TRAIN_MODES: tuple[str, ...] = get_args(TrainMode)


class BaseTask(SweepMixin, IntervalMixin, PredictMixin, L.LightningModule):
    """Common machinery of all tasks; a subclass implements :meth:`metrics` and :meth:`step` (docs/extending.md).

    Args:
        backbone: timm model name of the ViT.
        policy: merge policy applied to the backbone (NoMerge when omitted).
        pretrained: load the timm hub weights (needs network access).
        checkpoint_path: local weights file (timm/PyTorch state dict or safetensors) for the backbone, loaded
            with ``weights_only=True`` (never pickled code unless ``trust_checkpoint``). Taken from a ``--ckpt_path``
            checkpoint's hyper-parameters only when it is such a plain weights file (``docs/reliability.md``).
        backbone_kwargs: extra arguments of ``timm.create_model`` (e.g. depth, drop_path_rate).
        img_size: input size (linked from the data module); None keeps the backbone's.
        freeze_backbone: the older spelling of the modular regime: freezes the timm model (for classification
            its head too), on top of what ``train`` freezes. New configs use ``train``.
        init_from: a whole task checkpoint (a ``dtem fit`` ``.ckpt``: backbone, head, decoder, policy) whose
            weights start this run; not its trainer or optimizer state. Loaded with ``weights_only=True`` when
            the Trainer configures the model (:meth:`configure_model`); a file of another architecture is an
            error naming the first differing tensor. Its policy weights are used when they fit the policy,
            else the policy keeps its initialisation (one-line note). ``pretrained`` and ``checkpoint_path``
            are not loaded then; a ``ckpt_path`` restored by the Trainer replaces these weights (resuming).
        train: what trains: ``policy`` (DTEM's modular regime), ``policy+head`` (also the task's head: the
            classifier head, the segmentation decoder, the caption decoder; see :meth:`head_modules`) or
            ``all`` (end-to-end). What does not train is frozen and kept in eval mode while the task trains
            (no dropout or drop-path, norms in inference mode).
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
        test_checkpoints: name -> path of a ``dtem fit`` checkpoint (.ckpt) of the same task and backbone
            architecture (e.g. an end-to-end fit), read with ``weights_only=True``. Each adds rows to the same
            sweep: its own policy (rebuilt from the checkpoint's saved ``policy``) at every ``test_r``, and its
            own NoMerge row when the sweep has one, all evaluated with the checkpoint's weights (every tensor of
            its state_dict) on the same test samples, labelled with the name (``ToMeSoft [tome_soft_e2e]``), so
            ``interval_reference`` pairs them with this model's rows. Names: letters, digits, ``_ . + -``. Only
            ``dtem test`` evaluates them (fit and validate ignore them); a file of another architecture (or
            caption vocabulary) is refused at test start, naming the first differing tensor.
        trust_checkpoint: allow a ``checkpoint_path`` file that needs arbitrary pickled code to load (only
            for files you trust); by default such a file is refused. Set it on the command line or in a config:
            the ``dtem`` CLI never takes it from a checkpoint's hyper-parameters.
        interval_reference: row label (``policies()``) each sweep row is compared with at the same r: the
            ``d_<metric>`` columns hold the difference of the main metric and its paired bootstrap 95 %
            interval over the test samples. A policy swept once (NoMerge) is the reference of every r. None:
            no intervals. The reference row, NoMerge rows and rows without a reference at their r stay empty.
        bootstrap: resamples of the paired bootstrap (0: no intervals, no per-sample statistics kept).
        bootstrap_seed: seed of the resampling; every row of a sweep uses the same resamples.
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
        init_from: str | None = None,
        train: TrainMode = "all",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        no_weight_decay_1d: bool = True,
        # int | str | list in this order: jsonargparse then appends "8,4" (test_r+=8,4) as a string
        test_r: list[int | str | list] | None = None,
        test_policies: list[MergePolicy] | None = None,
        test_checkpoints: dict[str, str] | None = None,
        trust_checkpoint: bool = False,
        interval_reference: str | None = "ToMe",
        bootstrap: int = 1000,
        bootstrap_seed: int = 0,
    ) -> None:
        super().__init__()
        if train not in TRAIN_MODES:
            raise ValueError(f"train must be one of {TRAIN_MODES}, got {train!r}")
        if init_from is not None and not Path(init_from).is_file():
            raise FileNotFoundError(f"init_from {init_from!r} does not exist")
        self._init_from_loaded = False
        self._policy_trained = False  # its weights came from a checkpoint (ckpt_path, init_from) or a fit
        # Under LightningCLI the hyper-parameters are the config (class paths for components); from Python,
        # component objects are left out so checkpoints stay loadable with weights_only=True.
        from_cli = _given_hyperparameters.get() is not None
        self.save_hyperparameters(
            ignore=[] if from_cli else ["policy", "optimizer", "lr_scheduler", "test_policies"]
        )
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        encoder = MergingEncoder(
            backbone,
            policy,
            create_kwargs=self.backbone_create_kwargs(),
            pretrained=pretrained,
            checkpoint_path=checkpoint_path,
            trust_checkpoint=trust_checkpoint,
            weights_later=init_from is not None,
        )
        # The encoder is reached through this plain attribute; its parts are registered on the task under their
        # own names, in this order, so state_dict keys and parameter order are those of every checkpoint.
        object.__setattr__(self, "encoder", encoder)
        self._dropped_head = encoder.dropped_head
        self.backbone, self.policy = encoder.backbone, encoder.policy
        # Duplicates go before binding: a bound ToMe would keep reading keys through its hooks.
        encoder.add_policies(self._without_duplicates(list(test_policies or [])))
        self.test_policies = encoder.test_policies
        # The policy's own r, schedule included: ToMe(r=[8, 4, 0, 0]) is swept as that schedule.
        self.test_r = [self._check_r(r) for r in (test_r if test_r is not None else [self.policy.r])]
        no_merge = [p for p in encoder.all_policies() if isinstance(p, NoMerge)]
        if not no_merge and not all(any(encoder.schedule(r)) for r in self.test_r):
            encoder.add_policies([NoMerge()])  # the r = 0 row (see sweep)
        if self.traces_sources:
            encoder.trace_sources()
        self.add_test_checkpoints(test_checkpoints)
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.sweep_results: list[dict[str, Any]] = []
        self._input_size: tuple[int, int, int] | None = None

    # ------------------------------------------------------------------ model
    traces_sources = False  # the encoder keeps each token's map to input patches (dense tasks unmerge)

    def backbone_create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``timm.create_model``; subclasses add theirs (e.g. num_classes)."""
        kwargs = dict(self.hparams.backbone_kwargs or {})
        if self.hparams.img_size is not None:
            kwargs["img_size"] = self.hparams.img_size
        return kwargs

    def check_new_head(self, stage: str) -> None:
        """Refuse a classifier head that timm started afresh (the weights have another class count) when nothing
        trains it or brings trained weights for it: every sweep row would report chance-level accuracy.

        A fit whose head trains (``train`` ``all`` or ``policy+head``) says so in one line; a checkpoint restored
        by the Trainer (``ckpt_path``) or ``init_from`` brings its own head.
        """
        dropped = self._dropped_head
        if dropped is None:
            return
        if stage != "fit":
            raise ValueError(
                f"{dropped}: timm drops that head and no checkpoint brings a trained one: refusing to {stage} a "
                "random head (pass --ckpt_path of a fit of this task, or weights with the model's class count)"
            )
        if self.hparams.freeze_backbone or self.hparams.train == "policy":
            why = "freeze_backbone: true" if self.hparams.freeze_backbone else "train: policy"
            raise ValueError(
                f"{dropped}: timm drops that head and the new one would never train ({why}); train it with "
                "train: policy+head (without freeze_backbone), or pass weights with the model's class count"
            )
        self.print(f"note: {dropped}: a new head is trained")

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

    # ------------------------------------------------------------------ Lightning
    def setup(self, stage: str) -> None:
        self.val_metrics = self.metrics().to(self.device)
        self.test_metrics = nn.ModuleDict(
            {self.sweep_key(i, r): self.metrics() for i, _, _, r in self.sweep()}
        ).to(self.device)
        if self.hparams.bootstrap < 0:
            raise ValueError(f"bootstrap must be >= 0 resamples, got {self.hparams.bootstrap}")
        self._reset_sample_stats()

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
        if tokens := self.encoder.last_token_counts:
            self.log("train/tokens", float(tokens[-1]), batch_size=self.batch_size_of(batch))
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

    def on_fit_start(self) -> None:
        self.check_new_head("fit")

    def on_train_start(self) -> None:
        self._policy_trained = True
        self._dropped_head = None  # the new head trains from here

    def on_test_start(self) -> None:
        self.check_new_head("test")
        self.check_finite_weights()
        self.prepare_test_checkpoints()

    def on_predict_start(self) -> None:
        self.check_new_head("predict")
        self.check_finite_weights()
        self.start_predictions()

    def check_finite_weights(self) -> None:
        """Refuse to evaluate NaN or infinite weights (NaN logits score as class 0: chance level, no error)."""
        for name, t in self.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                ckpt = self.trainer.ckpt_path if self._trainer is not None else None
                raise FloatingPointError(
                    f"{name} holds {bad} non-finite value(s) of {t.numel()}"
                    + (f" (checkpoint {ckpt})" if ckpt else "")
                    + ": refusing to evaluate non-finite weights"
                )

    def batch_size_of(self, batch: Any) -> int:
        return len(batch[0])

    # ------------------------------------------------------------------ what trains (init_from, train)
    def head_modules(self) -> list[nn.Module]:
        """The task's head: what ``train='policy+head'`` trains besides the policy (subclasses name theirs)."""
        return []

    def frozen_modules(self) -> list[nn.Module]:
        """The largest submodules that do not train (the policy is never one of them).

        With ``train`` ``policy`` or ``policy+head``: everything outside the policy (and the head). With
        ``all``, and inside a training head: modules whose parameters were all frozen by the legacy flag
        ``freeze_backbone``.
        """
        return self._frozen()[0]

    def _frozen(self) -> tuple[list[nn.Module], list[nn.Parameter]]:
        """:meth:`frozen_modules`, and with ``policy``/``policy+head`` the parameters held directly by a module
        that contains a trained part (``backbone.cls_token`` and ``pos_embed`` next to the classifier head)."""
        mode = self.hparams.train
        keep = [self.policy] + (self.head_modules() if mode == "policy+head" else [])
        out: list[nn.Module] = []
        loose: list[nn.Parameter] = []

        def visit(module: nn.Module, structural: bool) -> None:
            if structural:
                loose.extend(module.parameters(recurse=False))
            for child in module.children():
                if child is self.policy:
                    continue
                if structural:
                    if any(child is k for k in keep):
                        visit(child, structural=False)
                    elif any(m is k for m in child.modules() for k in keep):
                        visit(child, structural=True)
                    else:
                        out.append(child)
                    continue
                params = list(child.parameters())
                if params and not any(p.requires_grad for p in params):
                    out.append(child)
                else:
                    visit(child, structural=False)

        visit(self, structural=mode != "all")
        return out, loose

    def apply_train_mode(self) -> None:
        """Freeze what ``train`` leaves out and, while the task trains, keep it in eval mode (idempotent).

        The merging blocks' own flag follows the task's mode even when their contents are in eval mode: it
        chooses the policy's training behaviour (DTEM-soft merges softly in training, docs/design.md §7).
        """
        frozen, loose = self._frozen()
        if self.hparams.train != "all":
            for m in frozen:
                m.requires_grad_(False)
            for p in loose:
                p.requires_grad_(False)
        if self.hparams.train == "policy+head":
            names = {id(m): n for n, m in self.named_modules()}
            for m in self.head_modules():
                params = list(m.parameters())
                if params and not any(p.requires_grad for p in params):
                    raise ValueError(
                        f"train='policy+head' but the head {names.get(id(m), type(m).__name__)} is frozen by "
                        "freeze_backbone: drop that setting"
                    )
        if self.training:
            for m in frozen:
                m.eval()
            self.encoder.set_merge_training(True)
        if frozen:  # intended: Lightning's note about modules in eval mode would only confuse
            warnings.filterwarnings(
                "ignore", message=r"Found \d+ module\(s\) in eval mode", category=PossibleUserWarning
            )

    def train(self, mode: bool = True) -> BaseTask:
        """Set the training mode; frozen parts (see :meth:`apply_train_mode`) stay in eval mode."""
        super().train(mode)
        if mode:
            self.apply_train_mode()
        return self

    def load_init_from(self) -> None:
        """Load the weights of the task checkpoint ``init_from`` (once; weights only, never pickled code).

        The checkpoint goes through :meth:`on_load_checkpoint` first (policy weights that do not fit the
        policy are replaced by its initialisation; a caption checkpoint brings its vocabulary), then every
        other tensor must match the model in name and shape.
        """
        path = self.hparams.init_from
        if path is None or self._init_from_loaded:
            return
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"refusing to load init_from {path}: it needs arbitrary pickled code, not just tensors (a "
                "`dtem fit` checkpoint never does)"
            ) from e
        if (
            isinstance(ckpt, dict)
            and "state_dict" not in ckpt
            and all(isinstance(v, Tensor) for v in ckpt.values())
        ):
            ckpt = {"state_dict": ckpt}  # a bare task state dict
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
            raise ValueError(
                f"init_from {path} holds no task state_dict: pass a `dtem fit` checkpoint (.ckpt)"
            )
        ckpt = {**ckpt, "state_dict": dict(ckpt["state_dict"])}  # on_load_checkpoint edits it in place
        self.on_load_checkpoint(ckpt)
        state = ckpt["state_dict"]
        check_same_tensors(self.state_dict(), state, f"init_from {path}")
        self.load_state_dict(state)
        self._init_from_loaded = True

    def configure_model(self) -> None:
        """Before the Trainer wraps (DDP) and optimises the model: load ``init_from``, then freeze per ``train``."""
        self.load_init_from()
        self.apply_train_mode()

    def configure_optimizers(self) -> Any:
        self.apply_train_mode()  # also when called without a Trainer
        decay, no_decay = [], []
        for p in self.parameters():
            if not p.requires_grad:
                continue
            (no_decay if self.hparams.no_weight_decay_1d and p.ndim <= 1 else decay).append(p)
        if not decay and not no_decay:
            raise ValueError(
                f"nothing to train: train={self.hparams.train!r} (freeze_backbone={self.hparams.freeze_backbone}) "
                f"and the policy {type(self.policy).__name__} has no parameters"
            )
        groups = [
            {"params": decay, "name": "decay"}
        ]  # names: LearningRateMonitor's lr-<optimizer>/<name> tags
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
        optimizer = self.optimizer(groups)
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        if isinstance(scheduler, CosineLR) and scheduler.total_steps is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        if (
            isinstance(scheduler, CosineLR)
            and scheduler.total_steps
            and scheduler.warmup_steps >= scheduler.total_steps
        ):
            warnings.warn(
                f"warmup_steps={scheduler.warmup_steps} is not shorter than the run ({scheduler.total_steps} steps): "
                "the learning rate never reaches its base value; lower warmup_steps",
                stacklevel=2,
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Policy weights as :meth:`SweepMixin.on_load_checkpoint` fits them; the checkpoint's head is trained."""
        super().on_load_checkpoint(checkpoint)
        self._dropped_head = None  # the checkpoint's head replaces the new one
