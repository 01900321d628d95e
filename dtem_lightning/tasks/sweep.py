"""The r-sweep of the test loop: one row per (policy, r), their labels, and the hooks that run them."""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import lightning as L
import torch
from torch import Tensor

from dtem_lightning import policy as policy_module
from dtem_lightning.encoder import parse_r, r_key, r_label
from dtem_lightning.io import load_weights_only, untrusted_class_paths
from dtem_lightning.policy import MergePolicy, NoMerge

# state_dict prefixes of the policies; every other tensor is the model's (backbone, head, decoder).
POLICY_KEYS = ("policy.", "test_policies.")
# A test checkpoint's name goes into row labels, sweep.csv and sweep.md: no brackets, commas, quotes, pipes, spaces.
CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9_.+-]+")


def policy_label(policy: MergePolicy, trained: bool) -> str:
    """Row name of a policy in sweep tables: its display name (``DTEM`` for DTEMSoft and DTEMHard, else the class
    name), marked "(trained)" or "(untrained)" when it has parameters."""
    name = type(policy).display_name or type(policy).__name__
    if not any(True for _ in policy.parameters()):
        return name
    return f"{name} ({'trained' if trained else 'untrained'})"


def distinct_labels(labels: list[str], policies: list[MergePolicy]) -> list[str]:
    """``labels`` made unique: a repeated label gets the init arguments in which its policy differs from the first
    policy of that label (``ToMe (prop_attn=False)``), else a running number (``DTEM (untrained #2)``); the first
    one stays bare unless it differs from its class's defaults there (``PiToMe (margin=0.5)``) and is not the task's
    own policy (row 0)."""

    def args(p: MergePolicy) -> dict[str, Any]:
        config = policy_config(p)
        return dict(config[1]) if config else {}

    def with_extra(label: str, extra: str) -> str:
        """``DTEM (untrained)`` + ``#2`` -> ``DTEM (untrained #2)``; ``ToMe`` + ``a=1`` -> ``ToMe (a=1)``."""
        if not label.endswith(")"):
            return f"{label} ({extra})"
        return f"{label[:-1]}{' ' if extra.startswith('#') else ', '}{extra})"

    def first_label(j: int, label: str) -> str:
        """The first policy of a repeated label keeps it bare only where it has its class's defaults; the task's
        own policy (row 0) keeps its label (notes and tools key on it)."""
        group = [policies[k] for k, other in enumerate(labels) if other == label]
        if len(group) < 2 or j == 0:
            return label
        mine = args(policies[j])
        varying = {k for p in group[1:] for k, v in args(p).items() if k in mine and mine[k] != v}
        defaults = inspect.signature(type(policies[j]).__init__).parameters
        own = [
            f"{k}={v}" for k, v in mine.items() if k in varying and k in defaults and defaults[k].default != v
        ]
        return with_extra(label, ", ".join(own)) if own else label

    out: list[str] = []
    for j, (label, p) in enumerate(zip(labels, policies)):
        first = labels.index(label)
        if first == j:
            out.append(first_label(j, label))
            continue
        mine, theirs = args(p), args(policies[first])
        extras = [", ".join(f"{k}={v}" for k, v in mine.items() if k in theirs and theirs[k] != v)]
        extras.append(f"#{labels[: j + 1].count(label)}")
        for extra in filter(None, extras):
            name = with_extra(label, extra)
            if name not in out:
                break
        out.append(name)
    return out


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


def policy_from_config(config: Any, where: str) -> MergePolicy:
    """The policy a saved ``policy`` hyper-parameter describes: ``{"class_path": ..., "init_args": {...}}`` as
    the ``dtem`` CLI saves it (a short name such as ``ToMe`` or a full class path), or None for NoMerge.

    The class is imported only from this package, torch, timm or Lightning (``where`` names the value in errors).
    """
    if config is None:
        return NoMerge()
    if isinstance(config, str):
        config = {"class_path": config}
    if not isinstance(config, dict) or not isinstance(config.get("class_path"), str):
        raise ValueError(f"{where} is not a policy class path with init_args: {config!r}")
    path, init = config["class_path"], dict(config.get("init_args") or {})
    if untrusted_class_paths(path):
        raise ValueError(
            f"{where} names {path!r}, outside dtem_lightning, torch, timm and lightning: refused"
        )
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module) if module else policy_module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, MergePolicy)):
        raise ValueError(f"{where} names {path!r}, which is not a merge policy class")
    try:
        return cls(**init)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {type(e).__name__}: {e}") from e


@dataclass
class CheckpointRows:
    """The rows of one ``test_checkpoints`` entry: its policies evaluated with its weights.

    Attributes:
        name: the entry's name, appended to its row labels (``ToMeSoft [name]``).
        path: the ``dtem fit`` checkpoint.
        policies: its own policy (rebuilt from its hyper-parameters), then a NoMerge of its own when the sweep has
            a NoMerge row; plain attributes, never in the task's state_dict (its checkpoints stay loadable).
        checkpoint: the checkpoint as loaded (tensors memory-mapped on the CPU).
        weights: (the model's tensor, its tensor) for every tensor but the policies', one pair per distinct model
            tensor (a tied weight once), its tensors on the model's device and in its dtype (set at test start, once
            checked against the model; None before).
    """

    name: str
    path: str
    policies: list[MergePolicy]
    checkpoint: dict[str, Any]
    weights: list[tuple[Tensor, Tensor]] | None = None


def load_checkpoint_rows(name: str, path: str, no_merge: bool) -> CheckpointRows:
    """Read the ``dtem fit`` checkpoint ``path`` (weights only, memory-mapped) and rebuild its policy from its
    saved hyper-parameters; with ``no_merge`` a NoMerge row of its own follows. Nothing is bound or checked
    against a model yet.

    Raises:
        ValueError: a bad ``name``, a file that is not a ``dtem fit`` checkpoint or has no saved policy.
        FileNotFoundError: ``path`` does not exist.
    """
    where = f"test_checkpoints[{name!r}]"
    if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name):
        raise ValueError(
            f"test_checkpoints name {name!r} must be non-empty letters, digits, '_', '.', '+' or '-' (it goes "
            "into row labels and sweep.csv)"
        )
    ckpt = load_weights_only(path, where, mmap=True)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{where} {path} holds no task state_dict: pass a `dtem fit` checkpoint (.ckpt)")
    if not isinstance(hparams, dict) or "policy" not in hparams:
        raise ValueError(
            f"{where} {path} has no saved policy (hyper_parameters['policy']): pass a checkpoint written by "
            "`dtem fit`, which saves its policy's class and arguments"
        )
    policies = [policy_from_config(hparams["policy"], f"{where} policy of {path}")]
    if no_merge and not isinstance(policies[0], NoMerge):
        policies.append(NoMerge())  # an end-to-end-trained backbone has its own r = 0 row
    return CheckpointRows(name, str(path), policies, ckpt)


def check_same_tensors(own: dict[str, Tensor], theirs: dict[str, Tensor], what: str) -> None:
    """Refuse ``theirs`` unless it has exactly ``own``'s keys with the same shapes; one line names ``what``, the
    first differing key and both shapes."""
    for k, v in own.items():
        if k not in theirs:
            raise ValueError(
                f"{what} does not match the model: it lacks {k} (shape {list(v.shape)} in the model)"
            )
        if tuple(theirs[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{what} does not match the model: {k} has shape {list(theirs[k].shape)} in the file, "
                f"{list(v.shape)} in the model"
            )
    extra = next((k for k in theirs if k not in own), None)
    if extra is not None:
        raise ValueError(
            f"{what} does not match the model: it has {extra} (shape {list(theirs[extra].shape)}), which the "
            "model lacks"
        )


Rate = TypeVar("Rate")


def sweep_rows(
    policies: Sequence[tuple[str, MergePolicy]], rs: Sequence[Rate]
) -> list[tuple[int, str, MergePolicy, Rate]]:
    """(index, label, policy, r) of a sweep of labelled ``policies`` over the rates ``rs``.

    NoMerge is one row at r = 0 (every policy at r = 0 computes exactly it); every other policy has a row per r.
    """
    out: list[tuple[int, str, MergePolicy, Rate]] = []
    for i, (label, p) in enumerate(policies):
        out += [(i, label, p, 0)] if isinstance(p, NoMerge) else [(i, label, p, r) for r in rs]
    return out


class SweepMixin:
    """The test loop of :class:`~dtem_lightning.tasks.base.BaseTask`: every policy at every ``test_r`` in one pass.

    Rows are ``(index, label, policy, r)`` (:meth:`sweep`), each with its own metric collection
    (:meth:`sweep_key`); ``on_test_epoch_end`` leaves one dict per row in ``sweep_results`` and a
    ``sweep_note`` for ``sweep.md`` (written by :class:`~dtem_lightning.callbacks.SweepWriter`).
    """

    _checkpoint_rows: Sequence[CheckpointRows] = ()  # test_checkpoints (add_test_checkpoints)

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

    def policies(self) -> list[tuple[str, MergePolicy]]:
        """(label, policy) pairs evaluated by the test loop: the task's own policy first, "(trained)" when a
        checkpoint (``ckpt_path``, ``init_from``) or a fit trained its parameters, test policies with parameters
        "(untrained)" (controls); repeated labels are told apart (:func:`distinct_labels`). Then the rows of each
        test checkpoint, labelled with its name (``ToMeSoft [tome_soft_e2e]``, ``NoMerge [tome_soft_e2e]``)."""
        policies = [self.policy, *self.test_policies]
        labels = [policy_label(self.policy, trained=self._policy_trained)]
        labels += [policy_label(p, trained=False) for p in self.test_policies]
        out = list(zip(distinct_labels(labels, policies), policies))
        for rows in self._checkpoint_rows:
            out += [(f"{policy_label(p, trained=True)} [{rows.name}]", p) for p in rows.policies]
        return out

    # ------------------------------------------------------------------ test checkpoints (their own weights)
    def add_test_checkpoints(self, test_checkpoints: dict[str, str] | None) -> None:
        """Rows of ``test_checkpoints`` (name -> ``dtem fit`` checkpoint): each one's policy, rebuilt from its
        hyper-parameters and bound to the backbone, and its own NoMerge when the sweep has a NoMerge row. Their
        weights are checked and moved at test start (:meth:`prepare_test_checkpoints`)."""
        self._checkpoint_rows = []  # a plain list: its policies are never in this task's state_dict
        no_merge = any(isinstance(p, NoMerge) for p in self.encoder.all_policies())
        info = self.encoder.backend.describe(self.encoder.backbone)
        for name, path in (test_checkpoints or {}).items():
            rows = load_checkpoint_rows(name, path, no_merge)
            # Binding draws the policy's initial parameters, replaced by the checkpoint's: the task's own random
            # stream stays as it would be without test checkpoints.
            with torch.random.fork_rng(devices=[]):
                for p in rows.policies:
                    p.bind(info)
                    p.trace_source = p.trace_source or self.traces_sources
            self._checkpoint_rows.append(rows)

    def prepare_test_checkpoints(self) -> None:
        """At test start: check each test checkpoint against the model (every tensor but the policies', same
        names and shapes; :meth:`check_test_checkpoint`), load its policy's weights, and put its weights and
        policies where the model is."""
        own = {k: v for k, v in self.state_dict(keep_vars=True).items() if not k.startswith(POLICY_KEYS)}
        targets = {id(t): (k, t) for k, t in own.items()}.values()  # a tied weight once
        info = self.encoder.backend.describe(self.encoder.backbone)
        for rows in self._checkpoint_rows:
            what = f"test_checkpoints[{rows.name!r}] {rows.path}"
            stored = rows.checkpoint["state_dict"]
            theirs = {k: v for k, v in stored.items() if not k.startswith(POLICY_KEYS)}
            check_same_tensors(own, theirs, what)
            self.check_test_checkpoint(rows.checkpoint, what)
            bad = next(
                (k for k, v in theirs.items() if v.is_floating_point() and not torch.isfinite(v).all()), None
            )
            if bad is not None:
                raise FloatingPointError(f"{what}: {bad} holds non-finite values: refusing to evaluate it")
            policy_state = {k[len("policy.") :]: v for k, v in stored.items() if k.startswith("policy.")}
            try:
                rows.policies[0].load_state_dict(policy_state)
            except RuntimeError as e:
                first = str(e).strip().splitlines()[-1].strip()
                raise ValueError(f"{what}: its policy's weights do not fit its saved policy ({first})") from e
            for p in rows.policies:
                p.to(device=info.device, dtype=info.dtype)
            # paired once here, not per batch: the rows swap them in every test step
            rows.weights = [(t, theirs[k].to(device=t.device, dtype=t.dtype)) for k, t in targets]

    def check_test_checkpoint(self, checkpoint: dict[str, Any], what: str) -> None:
        """Refuse a test checkpoint whose rows this task cannot evaluate although its tensors match (subclasses:
        e.g. another caption vocabulary of the same size); ``what`` names it in the error."""

    def _checkpoint_of(self, policy: MergePolicy) -> CheckpointRows | None:
        """The test checkpoint whose rows ``policy`` runs, if any."""
        return next((c for c in self._checkpoint_rows if any(p is policy for p in c.policies)), None)

    @contextmanager
    def _weights_of(self, rows: CheckpointRows | None) -> Iterator[None]:
        """Evaluate with the test checkpoint's weights in place of the task's own (every tensor but the
        policies', swapped through ``.data``); the own weights are back on exit, also after an error."""
        if rows is None:
            yield
            return
        if rows.weights is None:
            raise RuntimeError(
                f"test_checkpoints[{rows.name!r}] is evaluated in `dtem test` only (its weights are checked and "
                "loaded at test start)"
            )
        swapped: list[tuple[Tensor, Tensor]] = []
        try:
            for t, theirs in rows.weights:
                swapped.append((t, t.data))
                t.data = theirs
            yield
        finally:
            for t, own in reversed(swapped):
                t.data = own

    def sweep(self) -> list[tuple[int, str, MergePolicy, int | list[int]]]:
        """(index, label, policy, r) of every test-loop evaluation (r: constant or schedule).

        r = 0 is NoMerge whatever the policy (bit-identical), so it is one row: NoMerge's (added to the
        test policies when ``test_r`` holds a zero rate and no NoMerge is listed).
        """
        return sweep_rows(self.policies(), [r for r in self.test_r if any(self.encoder.schedule(r))])

    @staticmethod
    def sweep_key(i: int, r: int | list[int]) -> str:
        """Name of the metric collection of policy ``i`` at ``r`` (key-safe also for schedules)."""
        return f"p{i}_r{r_key(r)}"

    # ------------------------------------------------------------------ sizing a row (subclasses may override)
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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Let a checkpoint trained with one policy be tested with another (``ckpt_path``, ``init_from``).

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
        self._policy_trained = not any(k.startswith("policy.") for k in missing)
        if not self._policy_trained:
            warnings.warn(
                f"checkpoint has no weights for {type(self.policy).__name__}: its parameters keep "
                "their initialisation",
                stacklevel=2,
            )

    def on_test_epoch_start(self) -> None:
        for _, policy in self.policies():
            policy.reset_measurements()  # FLOPs and tokens of this test run only
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
                    gf = 0.0
                    for schedule, share in policy.measured_schedules():  # what ran (ATM: data-dependent)
                        with policy.replaying(schedule):
                            gf += share * self.gmacs(self._input_size)
                    tokens = self.encoder.token_counts(self.num_input_tokens(self._input_size))[-1]
            row = {"policy": label, "r": r_label(r), "gflops": gf, "tokens": tokens, **values}
            self.sweep_results.append(row)
        notes = [self.label_note(), self._add_intervals(row_stats) if pairs else ""]
        self.sweep_note = "\n\n".join(n for n in notes if n)
        self._test_stats, self._test_index = {}, []  # free the per-sample statistics

    def label_note(self) -> str:
        """What the learnable rows and the test checkpoints' rows of the sweep are ("" when it has none)."""
        lines = []
        for label, p in self.policies():
            rows = self._checkpoint_of(p)
            if rows is not None:
                how = "without merging" if isinstance(p, NoMerge) else "evaluated with hard merging"
                what = "weights" if isinstance(p, NoMerge) else "policy and weights"
                lines.append(f"{label}: the {what} of checkpoint {rows.path}, {how}.")
            elif not any(True for _ in p.parameters()):
                continue
            elif "(trained" in label:
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
        """Run the backbone with ``policy`` at reduction ``r`` (constant or schedule), and with its test
        checkpoint's weights when it is one of its rows; own policy and weights back afterwards."""
        with self.encoder.running(policy, r), self._weights_of(self._checkpoint_of(policy)):
            yield
