"""BaseTask: a timm ViT backbone with a merge policy, injected optimizer, and the r-sweep as the test loop."""

from __future__ import annotations

import inspect
import math
import os
import pickle
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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

from dtem_lightning import stats
from dtem_lightning.encoder import MergingEncoder, parse_r, r_key, r_label
from dtem_lightning.io import write_csv
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


TrainMode = Literal["policy", "policy+head", "all"]
TRAIN_MODES: tuple[str, ...] = get_args(TrainMode)


def policy_label(policy: MergePolicy, trained: bool) -> str:
    """Row name of a policy in sweep tables: its display name (``DTEM`` for DTEMSoft and DTEMHard, else the class
    name), marked "(trained)" or "(untrained)" when it has parameters."""
    name = type(policy).display_name or type(policy).__name__
    if not any(True for _ in policy.parameters()):
        return name
    return f"{name} ({'trained' if trained else 'untrained'})"


def distinct_labels(labels: list[str], policies: list[MergePolicy]) -> list[str]:
    """``labels`` made unique: a repeated label gets the init arguments in which its policy differs from the first
    policy of that label (``ToMe (prop_attn=False)``), else a running number (``DTEM (untrained #2)``)."""

    def args(p: MergePolicy) -> dict[str, Any]:
        config = policy_config(p)
        return dict(config[1]) if config else {}

    out: list[str] = []
    for j, (label, p) in enumerate(zip(labels, policies)):
        first = labels.index(label)
        if first == j:
            out.append(label)
            continue
        mine, theirs = args(p), args(policies[first])
        extras = [", ".join(f"{k}={v}" for k, v in mine.items() if k in theirs and theirs[k] != v)]
        extras.append(f"#{labels[: j + 1].count(label)}")
        for extra in filter(None, extras):
            sep = " " if extra.startswith("#") else ", "
            name = f"{label[:-1]}{sep}{extra})" if label.endswith(")") else f"{label} ({extra})"
            if name not in out:
                break
        out.append(name)
    return out


def source_names(dataset: Any) -> list[str]:
    """Image names of a dataset's samples in index order, as the dataset stores them (``samples`` of (name, ...)
    or ``pairs`` of (image, label) names); [] when it does not list them."""
    items = getattr(dataset, "samples", None) or getattr(dataset, "pairs", None) or []
    try:
        return [str(item[0]) for item in items]
    except (TypeError, IndexError):
        return []


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
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.sweep_results: list[dict[str, Any]] = []
        self._input_size: tuple[int, int, int] | None = None

    def _check_r(self, r: int | list[int] | str) -> int | list[int]:
        """One ``test_r`` entry parsed and checked against the backbone's depth (errors name the entry)."""
        try:
            r = parse_r(r)
            self.encoder.schedule(r)
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

    def policies(self) -> list[tuple[str, MergePolicy]]:
        """(label, policy) pairs evaluated by the test loop: the task's own policy first, "(trained)" when a
        checkpoint (``ckpt_path``, ``init_from``) or a fit trained its parameters, test policies with parameters
        "(untrained)" (controls); repeated labels are told apart (:func:`distinct_labels`)."""
        policies = [self.policy, *self.test_policies]
        labels = [policy_label(self.policy, trained=self._policy_trained)]
        labels += [policy_label(p, trained=False) for p in self.test_policies]
        return list(zip(distinct_labels(labels, policies), policies))

    def sweep(self) -> list[tuple[int, str, MergePolicy, int | list[int]]]:
        """(index, label, policy, r) of every test-loop evaluation (r: constant or schedule).

        r = 0 is NoMerge whatever the policy (bit-identical), so it is one row: NoMerge's (added to the
        test policies when ``test_r`` holds a zero rate and no NoMerge is listed).
        """
        out = []
        for i, (label, p) in enumerate(self.policies()):
            if isinstance(p, NoMerge):
                out.append((i, label, p, 0))
                continue
            out += [(i, label, p, r) for r in self.test_r if any(self.encoder.schedule(r))]
        return out

    @staticmethod
    def sweep_key(i: int, r: int | list[int]) -> str:
        """Name of the metric collection of policy ``i`` at ``r`` (key-safe also for schedules)."""
        return f"p{i}_r{r_key(r)}"

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
        return self.encoder.gmacs(input_size)

    def input_size_of(self, batch: Any) -> tuple[int, int, int]:
        """(C, H, W) of the images in ``batch``."""
        return tuple(batch[0].shape[1:])

    def input_size_for_flops(self, trainer: L.Trainer) -> tuple[int, int, int]:
        """(C, H, W) the data module produces, else the backbone's own input size."""
        size = getattr(trainer.datamodule, "input_size", None)
        return tuple(size) if size else (3, *self.encoder.img_size)

    def num_input_tokens(self, input_size: tuple[int, int, int]) -> int:
        """Tokens entering block 0 for images of ``input_size``."""
        return self.encoder.num_tokens(tuple(input_size[1:]))

    # ------------------------------------------------------------------ per-sample statistics (intervals)
    interval_metric: str | None = None  # metric column that gets paired intervals; None: the task has none

    def sample_stats(self, preds: Any, target: Any) -> Tensor | None:
        """Per-sample statistics [B, *S] of one test batch whose sums over samples give ``interval_metric``
        (see :meth:`interval_statistic`); None (the default): none kept per batch."""
        return None

    def interval_statistic(self, totals: Tensor, n: int) -> Tensor:
        """``interval_metric`` [R] of R corpora of n samples from their summed statistics ``totals`` [R, *S]."""
        return stats.mean_statistic(totals, n)

    def row_sample_stats(self, key: str) -> Tensor | None:
        """Per-sample statistics [m, *S] of sweep row ``key`` from every process, rank after rank, each rank in
        batch order (torchmetrics gathers list states in this order too). Called by ``on_test_epoch_end`` on
        every process after the row's metrics are computed and before they are reset."""
        local = self._test_stats.get(key)
        return self._gather(torch.cat(local)) if local else None

    def interval_pairs(self) -> dict[int, int]:
        """Position in :meth:`sweep` -> position of its reference row (``interval_reference``); {}: no intervals.

        The reference is the row labelled ``interval_reference`` at the same r (a policy swept once, NoMerge,
        is the reference of every r); when two policies share that label, the first one. The reference's
        own rows and NoMerge rows have none.
        """
        ref, entries = self.hparams.interval_reference, self.sweep()
        if ref is None or self.hparams.bootstrap <= 0 or self.interval_metric is None:
            return {}
        owner = next((i for i, label, _, _ in entries if label == ref), None)
        if owner is None:
            return {}
        refs = [(j, p, r) for j, (i, _, p, r) in enumerate(entries) if i == owner]
        pairs = {}
        for j, (i, _, p, r) in enumerate(entries):
            if i == owner or isinstance(p, NoMerge):
                continue
            match = [k for k, q, rr in refs if isinstance(q, NoMerge) or r_key(rr) == r_key(r)]
            if match:
                pairs[j] = match[0]
        return pairs

    @staticmethod
    def _gather(t: Tensor) -> Tensor:
        """``t`` [m, ...] of every process concatenated rank after rank (sizes may differ); ``t`` alone without
        DDP."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return t
        from torchmetrics.utilities.distributed import gather_all_tensors

        return torch.cat(gather_all_tensors(t.contiguous()))

    def _reset_sample_stats(self) -> None:
        self._test_stats: dict[str, list[Tensor]] = {}  # row key -> per-batch [B, *S] statistics
        self._test_index: list[Tensor] = []  # per-batch [B] dataset indices of the samples
        self._test_batches: list[list[int]] | None = None  # this process's batches as its sampler lists them
        self._test_seen = 0
        self._keep_stats = False
        self.sweep_note = ""

    def _sampler_batches(self) -> list[list[int]] | None:
        """Dataset indices of each test batch of this process, as its (distributed) sampler lists them."""
        loader = self.trainer.test_dataloaders if self._trainer is not None else None
        if isinstance(loader, list | tuple):
            loader = loader[0] if len(loader) == 1 else None
        batch_sampler = getattr(loader, "batch_sampler", None)
        if batch_sampler is None:  # an iterable dataset: no indices to read
            return None
        return [list(b) for b in batch_sampler]  # test samplers do not shuffle: the order of the loop

    def _sample_index(self, batch: Any, batch_idx: int) -> Tensor:
        """[B] dataset indices of the samples of test batch ``batch_idx`` of this process.

        Read from the sampler (a DistributedSampler's padding repeats indices: ``on_test_epoch_end`` keeps each
        sample once). Without a sampler, the position in the loop, interleaved over processes as a
        DistributedSampler deals them out: unique, so nothing is dropped.
        """
        size = self.batch_size_of(batch)
        order = self._test_batches
        if order is not None:
            if batch_idx >= len(order) or len(order[batch_idx]) != size:
                raise RuntimeError(
                    f"test batch {batch_idx} holds {size} samples but the sampler lists "
                    f"{len(order[batch_idx]) if batch_idx < len(order) else 'no'} batch there: cannot pair "
                    "per-sample statistics (set --model.init_args.bootstrap=0 to skip the intervals)"
                )
            return torch.tensor(order[batch_idx], dtype=torch.long)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        position = self._test_seen + torch.arange(size)
        self._test_seen += size
        return position * world + rank

    def _add_intervals(self, row_stats: dict[str, Tensor]) -> str:
        """Fill the ``d_<metric>`` columns of ``sweep_results`` from gathered per-sample statistics.

        Args:
            row_stats: row key -> [m, *S] statistics of the rows in :meth:`interval_pairs`, rank after rank.

        Returns:
            A note saying what the columns hold ("" when there are none).
        """
        pairs, entries = self.interval_pairs(), self.sweep()
        keys = [self.sweep_key(i, r) for i, _, _, r in entries]
        used = sorted({keys[j] for pair in pairs.items() for j in pair})
        if not pairs or not self._test_index or any(k not in row_stats for k in used):
            return ""
        index = self._gather(torch.cat(self._test_index).to(self.device)).cpu()
        for k in used:
            if len(row_stats[k]) != len(index):
                raise RuntimeError(
                    f"per-sample statistics of {k} cover {len(row_stats[k])} samples but the test loop indexed "
                    f"{len(index)}"
                )
        once = stats.first_occurrences(index)  # dataset order, padded duplicates out: any world size alike
        per_row = {k: row_stats[k].cpu()[once] for k in used}
        R, seed, level = self.hparams.bootstrap, self.hparams.bootstrap_seed, 0.95
        boot = stats.bootstrap(per_row, self.interval_statistic, R, seed)
        m, ref = self.interval_metric, self.hparams.interval_reference
        for j, row in enumerate(self.sweep_results):
            d = lo = hi = name = None
            if j in pairs:
                a, b = keys[j], keys[pairs[j]]
                d, lo, hi = stats.paired_difference(
                    per_row[a], per_row[b], boot[a], boot[b], self.interval_statistic, level
                )
                name = ref
            row.update({f"d_{m}": d, f"d_{m}_lo": lo, f"d_{m}_hi": hi, "d_ref": name})
        n, padded = len(once), len(index) - len(once)
        at = "" if isinstance(entries[next(iter(pairs.values()))][2], NoMerge) else " at the same r"
        note = (
            f"d_{m}: {m} minus the {ref} row{at}, with its paired bootstrap {level:.0%} percentile "
            f"interval [d_{m}_lo, d_{m}_hi] over the same {n} test samples ({R} resamples, seed {seed})."
        )
        if padded:
            note += (
                f" The distributed sampler repeated {padded} sample(s) to fill the last batches: the intervals "
                "count each sample once, the metric columns count the repeats."
            )
        return note

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

    def on_predict_start(self) -> None:
        self.check_new_head("predict")
        self.check_finite_weights()
        names = source_names(getattr(self._predict_loader(), "dataset", None))
        root = getattr(getattr(self.trainer, "datamodule", None), "root", None)
        if root is not None and Path(root).is_dir():  # names relative to the data root the user gave
            names = [os.path.relpath(n, root) if os.path.isabs(n) else n for n in names]
        self._predict_names = names
        self._predict_rows: list[dict[str, Any]] = []

    def _predict_loader(self) -> Any:
        loader = self.trainer.predict_dataloaders
        return loader[0] if isinstance(loader, list | tuple) else loader

    def predict_names(self, batch_idx: int, n: int) -> list[str]:
        """Source names (image names as the dataset stores them) of the ``n`` samples of predict batch
        ``batch_idx``; their dataset index when the dataset does not name them."""
        # Lightning wraps the predict batch sampler and records the indices of each batch it yields (iterating
        # the wrapper here would consume the loop's own iterator).
        seen = getattr(getattr(self._predict_loader(), "batch_sampler", None), "seen_batch_indices", None)
        index = seen[batch_idx] if seen and batch_idx < len(seen) else [batch_idx * n + j for j in range(n)]
        names = getattr(self, "_predict_names", [])
        return [names[i] if i < len(names) else f"{i:05d}" for i in index[:n]]

    def predict_rows(self, batch: Any) -> list[dict[str, Any]]:
        """One row of ``predictions.csv`` per sample of a predict batch (the task's own columns)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement predict")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Rows of ``predictions.csv``: the source image's name, then the task's columns (:meth:`predict_rows`)."""
        rows = self.predict_rows(batch)
        rows = [{"image": name, **row} for name, row in zip(self.predict_names(batch_idx, len(rows)), rows)]
        self._predict_rows += rows
        return rows

    def on_predict_epoch_end(self) -> None:
        """Write ``<run>/predictions.csv`` (``predictions_rank<k>.csv`` per process under DDP)."""
        rows = getattr(self, "_predict_rows", [])
        if not rows or not self.trainer.log_dir:
            return
        name = (
            "predictions.csv" if self.trainer.world_size == 1 else f"predictions_rank{self.global_rank}.csv"
        )
        path = write_csv(Path(self.trainer.log_dir) / name, rows, list(rows[0]))
        self.print(f"{len(rows)} predictions written to {path}")

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

    def on_test_epoch_start(self) -> None:
        self._reset_sample_stats()
        ref, labels = self.hparams.interval_reference, [label for label, _ in self.policies()]
        wanted = ref is not None and self.hparams.bootstrap > 0 and self.interval_metric is not None
        if wanted and ref not in labels and len(labels) > 1 and self.global_rank == 0:
            warnings.warn(
                f"interval_reference {ref!r} is none of this sweep's policies {labels}: no intervals (set "
                "--model.init_args.interval_reference to one of them, or bootstrap=0)",
                stacklevel=2,
            )
        self._keep_stats = bool(self.interval_pairs())
        if self._keep_stats:
            self._test_batches = self._sampler_batches()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        if self._input_size is None:
            self._input_size = self.input_size_of(batch)
        keep = self._keep_stats
        for i, _, policy, r in self.sweep():
            with self.running(policy, r):
                preds, target = self.evaluate(batch)
            key = self.sweep_key(i, r)
            self.test_metrics[key].update(preds, target)
            if keep and (s := self.sample_stats(preds, target)) is not None:
                self._test_stats.setdefault(key, []).append(s.detach())
        if keep:
            self._test_index.append(self._sample_index(batch, batch_idx))

    def on_test_epoch_end(self) -> None:
        self.sweep_results = []
        pairs = self.interval_pairs() if self._keep_stats else {}
        paired = {j for pair in pairs.items() for j in pair}
        row_stats: dict[str, Tensor] = {}
        for j, (i, label, policy, r) in enumerate(self.sweep()):
            key = self.sweep_key(i, r)
            computed = self.test_metrics[key].compute()
            values = {k: float(v) for k, v in computed.items() if v.numel() == 1}  # scalar columns only
            if j in paired and (s := self.row_sample_stats(key)) is not None:
                row_stats[key] = s  # read before the reset: captioning's come from the computed metric
            self.test_metrics[key].reset()
            gf, tokens = float("nan"), -1  # no test batch seen: nothing to size the model with
            if self._input_size is not None:
                with self.running(policy, r):
                    gf = self.gmacs(self._input_size)
                    tokens = self.encoder.token_counts(self.num_input_tokens(self._input_size))[-1]
            row = {"policy": label, "r": r_label(r), "gflops": gf, "tokens": tokens, **values}
            self.sweep_results.append(row)
        notes = [self.label_note(), self._add_intervals(row_stats) if pairs else ""]
        self.sweep_note = "\n\n".join(n for n in notes if n)
        self._test_stats, self._test_index = {}, []  # free the per-sample statistics

    def label_note(self) -> str:
        """What the learnable rows of the sweep are ("" when it has none)."""
        labels = [label for label, p in self.policies() if any(True for _ in p.parameters())]
        lines = []
        for label in labels:
            if "(trained" in label:
                lines.append(f"{label}: the learned policy of this run, evaluated with hard merging.")
            else:
                lines.append(
                    f"{label}: a policy with freshly initialised parameters (a control; no checkpoint or fit "
                    "trained it), evaluated with hard merging."
                )
        if lines:
            lines.append("NoMerge: no merging; every policy at r = 0 computes exactly this row.")
        return "\n".join(f"- {line}" for line in lines)

    @contextmanager
    def running(self, policy: MergePolicy, r: int | list[int]) -> Iterator[None]:
        """Run the backbone with ``policy`` at reduction ``r`` (constant or schedule); own policy back afterwards."""
        with self.encoder.running(policy, r):
            yield

    def batch_size_of(self, batch: Any) -> int:
        return len(batch[0])

    # ------------------------------------------------------------------ what trains (init_from, train)
    def head_modules(self) -> list[nn.Module]:
        """The task's head: what ``train='policy+head'`` trains besides the policy (subclasses name theirs)."""
        return []

    def frozen_modules(self) -> list[nn.Module]:
        """The largest submodules that do not train (the policy is never one of them).

        With ``train`` ``policy`` or ``policy+head``: everything outside the policy (and the head). With
        ``all``, and inside a training head: modules whose parameters were all frozen by a legacy flag
        (``freeze_backbone``, ``freeze_decoder``).
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
                        "freeze_backbone or freeze_decoder: drop that setting"
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
        state, own = ckpt["state_dict"], self.state_dict()
        for k, v in own.items():
            if k not in state:
                raise ValueError(
                    f"init_from {path} does not match the model: it lacks {k} (shape {list(v.shape)} in the model)"
                )
            if tuple(state[k].shape) != tuple(v.shape):
                raise ValueError(
                    f"init_from {path} does not match the model: {k} has shape {list(state[k].shape)} in the "
                    f"file, {list(v.shape)} in the model"
                )
        extra = next((k for k in state if k not in own), None)
        if extra is not None:
            raise ValueError(
                f"init_from {path} does not match the model: it has {extra} (shape "
                f"{list(state[extra].shape)}), which the model lacks"
            )
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
        """Let a checkpoint trained with one policy be tested with another.

        Policy weights the current policies do not have (or have in another shape, e.g. another embedding
        width) are dropped, and policy weights they need but the checkpoint lacks keep their initialisation;
        each case prints one line.
        """
        state = checkpoint.get("state_dict", {})
        own = self.state_dict()
        policy_keys = ("policy.", "test_policies.")
        other_shape = [
            k for k in state if k.startswith(policy_keys) and k in own and state[k].shape != own[k].shape
        ]
        extra = [k for k in state if k.startswith(policy_keys) and k not in own] + other_shape
        missing = [k for k in own if k.startswith(policy_keys) and k not in state] + other_shape
        first = extra[0] if extra else None
        if first in other_shape:
            first = f"{first}: {list(state[first].shape)} in the checkpoint, {list(own[first].shape)} here"
        for k in extra:
            del state[k]
        for k in missing:
            state[k] = own[k]
        if extra:
            warnings.warn(
                f"checkpoint policy weights unused by {type(self.policy).__name__}: {len(extra)} tensors "
                f"ignored ({first}, ...)",
                stacklevel=2,
            )
        self._dropped_head = None  # the checkpoint's head replaces the new one
        self._policy_trained = not any(k.startswith("policy.") for k in missing)
        if not self._policy_trained:
            warnings.warn(
                f"checkpoint has no weights for {type(self.policy).__name__}: its parameters keep "
                "their initialisation",
                stacklevel=2,
            )
