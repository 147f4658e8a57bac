"""One plain training loop for teachers and students alike, on one device or many (DDP).

SGD (momentum, optional Nesterov) with weight decay, linear warm-up then cosine / step / constant
learning-rate schedule evaluated per step (`pipeline.training.schedule`), optional gradient clipping,
bf16 autocast on CUDA and channels_last memory format everywhere. Every epoch ends with a resume state
(`pipeline.training.resume`: model, optimizer, epoch, history, per-rank RNG and loss state, in safetensors +
JSON, never pickled) written atomically into the run's state folder, with the run's fingerprint, so a resumed
run continues an interrupted one to the same weights as an uninterrupted one with the same seed (the data
stream is a pure function of `(seed, epoch)`), and a state of another run is never continued. The history (and
so `history.json` and the curves) holds no wall-clock value: equal inputs give byte-identical files; each
epoch's seconds, samples/s and loader wait go to the run log (`run_log`) instead.

A non-finite loss stops the run (`NonFiniteLossError`, naming the epoch, the step and the batch's sample keys)
before anything of that epoch is saved: a NaN never trains on silently into a written model.

Teacher logits come from the batch (`"logits"`, cached) or from a live `teacher` module (online
mode, for comparison); the student never sees a teacher object in cache mode.

Length and selection: the run's length is resolved once from the config and the data's size
(`pipeline.training.schedule.resolve_schedule`: `steps`, or `epochs` raised to `min_steps`) and logged.
After every `eval_every` epochs the model is scored on the validation split (never the test split),
and with `select: best_val` the weights of the best-scoring epoch are the ones returned (ties keep
the earlier epoch); the history records `val_acc` per epoch, `TrainResult` the selected epoch.

Under `torch.distributed` (world size > 1) the model is wrapped in DistributedDataParallel. DDP
needs every rank to run the same number of forward/backward passes, but shards are split across
ranks whole, so ranks can receive different sample counts. Every rank therefore computes the
epoch's plan (batches per rank) from the manifest (`BatchSource.plan`) and runs `max(batches)`
steps; a rank that has run out does a zero-weight step (a dummy forward in eval mode, loss 0) so
the gradient all-reduce and the optimizer stay in lockstep, and real ranks scale their loss by
`world / active ranks`, so the averaged gradient is the mean over the ranks that had data. No
sample is dropped or repeated. Only rank 0 writes checkpoints and curves and evaluates.

The loop reads top to bottom as its steps: `_restore` (resume), `_train_epoch` (the step loop, one
`_batch_loss` per batch), `_epoch_row` (cross-rank totals), `_held_out_accuracy` + `_Selection`
(validation and the best epoch), `_save`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from pipeline.config import TrainConfig
from pipeline.data.shards import sample_key
from pipeline.errors import UserError
from pipeline.losses.base import mixed_cross_entropy
from pipeline.models.checkpoint import CheckpointError, atomic_write
from pipeline.models.predict import to_input
from pipeline.runtime import rank_world, write_run_log
from pipeline.training import resume as resume_state
from pipeline.training.dataset import DistillDataset
from pipeline.training.phases import NO_TIMER, PhaseTimer
from pipeline.training.pool import ComparisonTracker
from pipeline.training.schedule import Schedule, lr_at, make_optimizer, resolve_schedule
from pipeline.training.source import BatchSource, EpochPlan
from pipeline.training.transport import FEATURE_PREFIX, make_loader, prefetch_to_device
from pipeline.training.validate import predict_split, topk_accuracy

log = logging.getLogger(__name__)

LossFn = Callable[..., dict[str, torch.Tensor]]

#: TrainConfig keys that say how a run executes, not what it computes: a resumed run may change them
_HOW_IT_RUNS = ("threads", "worker_start")


class NonFiniteLossError(UserError):
    """The loss became NaN or Inf: the run stops before saving anything of that epoch (no model is written)."""


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when enabled, else a no-op: chosen once per run (as nanoGPT's `ctx`)."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def arch_label(model: nn.Module) -> str:
    """A name for the model's architecture when the caller gives none: class + parameter-shape fingerprint.

    Two different architectures of one class (cnn_tiny vs cnn_small are both PlainCNN) differ in
    their parameter shapes, so the fingerprint tells them apart.
    """
    if isinstance(getattr(model, "arch", None), str):
        return model.arch
    inner = getattr(model, "net", model)  # `Normalized` wraps the zoo network
    shapes = ";".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    return f"{type(inner).__name__}#{hashlib.sha256(shapes.encode()).hexdigest()[:8]}"


@dataclass
class _Run:
    """What the steps of one training run share."""

    model: nn.Module  # the bare model (checkpoints, evaluation)
    ddp_model: nn.Module  # what the step calls: `model` itself, or its DistributedDataParallel wrapper
    loss_fn: LossFn
    opt: torch.optim.Optimizer
    cfg: TrainConfig
    device: torch.device
    ctx: contextlib.AbstractContextManager  # autocast (or nothing), chosen once
    rank: int
    world: int
    desc: str
    teacher: nn.Module | None = None  # online mode only
    comparisons: ComparisonTracker | None = None
    idle_x: torch.Tensor | None = None  # (1, C, H, W): the input of a zero-weight step
    schedule: Schedule | None = None  # resolved once the loader's plan is known
    timer: PhaseTimer = NO_TIMER  # per-phase step times (benchmarks); a no-op otherwise
    state_dir: Path | None = None  # where the per-epoch resume state goes (outside every DVC output)
    fingerprint: dict[str, Any] = field(default_factory=dict)  # the run a resume state must belong to


@dataclass
class TrainResult:
    """What `train` returns: the per-epoch history, the resolved schedule and the checkpoint it kept."""

    history: list[dict[str, float]]
    schedule: Schedule
    selected_epoch: int  # 1-based epoch whose weights the model now holds
    val_acc: float | None  # its validation top-1 (None without a validation split)

    def summary(self) -> dict[str, Any]:
        """For metrics files: schedule, selection and validation accuracy."""
        return {
            "schedule": self.schedule.to_dict(),
            "selected_epoch": self.selected_epoch,
            "val_accuracy": self.val_acc,
        }


@dataclass
class _Selection:
    """The best epoch on validation so far, and a CPU copy of its weights (rank-local; saved for resume)."""

    enabled: bool
    best_acc: float | None = None
    best_epoch: int = 0
    state: dict[str, torch.Tensor] | None = None

    def offer(self, model: nn.Module, epoch: int, val_acc: float | None) -> None:
        if not self.enabled or val_acc is None:
            return
        if self.best_acc is None or val_acc > self.best_acc:  # strictly better: ties keep the earlier epoch
            self.best_acc, self.best_epoch = val_acc, epoch + 1
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def to_state(self) -> dict[str, Any]:
        return {"best_acc": self.best_acc, "best_epoch": self.best_epoch, "state": self.state}

    def load(self, d: dict[str, Any] | None) -> None:
        if d:
            self.best_acc, self.best_epoch, self.state = d["best_acc"], d["best_epoch"], d["state"]


@dataclass
class _EpochTotals:
    """One rank's sums over an epoch (kept on the device during the epoch: no per-step host sync)."""

    seen: int = 0
    correct: torch.Tensor | None = None  # () long
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # loss part -> sum over samples
    waited: float = 0.0  # seconds blocked on the loader: ~0 when the data path keeps up
    seconds: float = 0.0
    first_bad: torch.Tensor | None = None  # () long: the first step whose loss was not finite (-1: none)
    indices: list[Any] = field(default_factory=list)  # each step's sample indices (host): named if its loss is bad


def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_set: BatchSource,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    val_set: DistillDataset | None = None,
    device: torch.device | None = None,
    resume: bool | Literal["auto"] = False,
    state_dir: str | Path | None = None,
    fingerprint: dict[str, Any] | None = None,
    teacher: nn.Module | None = None,
    desc: str = "train",
    stop_after_epoch: int | None = None,
    arch: str | None = None,
    on_batch: Callable[[int, dict[str, Any]], None] | None = None,
    run_log: str | Path | None = None,
    phases: PhaseTimer | None = None,
) -> TrainResult:
    """Train `model` in place; returns the history (also written to `out_dir/history.json`) and the selection.

    loss_fn(student (B, C), teacher (B, C), target (B,), epoch=float) -> {"loss": ..., parts...}.
    val_set: the held-out split scored after every `cfg.eval_every` epochs (`cfg.select: best_val` keeps
    the best epoch's weights; without a val_set the last epoch's are kept).
    `stop_after_epoch` ends the run early after that (0-based) epoch (used to test resume).
    Resume state: written every epoch to `state_dir` (default `out_dir/resume`) with the run's fingerprint
    (`arch`, the training config, the data, the library's code, plus the caller's `fingerprint` keys: loss,
    store...). `resume=True` continues from it and refuses a missing state or another run's (naming the keys
    that differ); `"auto"` continues a matching state and otherwise starts over (with a warning for another
    run's); False starts over. `arch` names the architecture (default: `arch_label(model)`).
    `on_batch(epoch, batch)` sees every real batch
    (tests use it to check which samples each rank trained on). `run_log`: a JSON file (outside every
    DVC output) for each epoch's timings (`seconds`, `samples_per_s`, `data_wait_s`), written by rank 0.
    `phases`: a `PhaseTimer` that collects where each step's time goes (benchmarks; it syncs CUDA per phase).
    Under an initialised process group with world size > 1 the model trains with DDP (see module doc).
    """
    device = device or torch.device("cpu")
    rank, world = rank_world()
    out_dir = Path(out_dir)
    # channels_last on CPU too: faster convolutions and pooling (oneDNN), and the (B, H, W, C) -> (B, C, H, W)
    # input conversion already yields channels_last inputs.
    model.to(device, memory_format=torch.channels_last)
    if teacher is not None:
        teacher.eval().to(device, memory_format=torch.channels_last)
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)
    arch = arch or arch_label(model)
    opt = make_optimizer(model, cfg.optim)
    selection = _Selection(enabled=cfg.select == "best_val" and val_set is not None)
    if cfg.select == "best_val" and val_set is None:
        log.warning("%s: no validation split to select a checkpoint on: keeping the last epoch's weights", desc)
    state_dir = Path(state_dir) if state_dir is not None else out_dir / "resume"
    run_fp = _fingerprint(cfg, arch, loss_fn, train_set, fingerprint)
    history, start_epoch = [], 0
    if resume:
        history, start_epoch = _restore(state_dir, run_fp, model, opt, loss_fn, device, rank, world, selection, resume)
    if start_epoch == 0:
        torch.manual_seed(cfg.seed)
    timings = _earlier_timings(run_log, start_epoch)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    ddp_model = model
    if world > 1:  # DDP broadcasts rank 0's weights at construction, then all-reduces (averages) gradients every step
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    h, w, c = train_set.recipe.out_shape(train_set.manifest.image_shape)  # the views' shape
    run = _Run(
        model=model,
        ddp_model=ddp_model,
        loss_fn=loss_fn,
        opt=opt,
        cfg=cfg,
        device=device,
        ctx=autocast_context(device, cfg.amp),
        rank=rank,
        world=world,
        desc=desc,
        teacher=teacher,
        comparisons=ComparisonTracker(loss_fn),
        idle_x=torch.zeros(1, c, h, w, device=device).contiguous(memory_format=torch.channels_last),
        timer=phases or NO_TIMER,
        state_dir=state_dir,
        fingerprint=run_fp,
    )
    loader = make_loader(train_set, cfg.batch_size, cfg.workers, start=cfg.worker_start)
    first = train_set.plan(cfg.batch_size, loader.num_workers, epoch=0)
    schedule = resolve_schedule(cfg, first.steps, sum(first.samples))
    run.schedule = schedule
    epochs = math.ceil(schedule.steps / schedule.steps_per_epoch)
    if rank == 0:
        schedule.announce(log, desc)  # a warning when min_steps raised the epochs asked for
    next_it: Iterator[dict[str, Any]] | None = None  # the next epoch's loader, started before this epoch ends
    for epoch in range(start_epoch, epochs):
        if next_it is None:
            train_set.set_epoch(epoch)
        plan = train_set.plan(cfg.batch_size, loader.num_workers)
        if len(plan.batches) != world:
            raise RuntimeError(f"data set split for {len(plan.batches)} rank(s), but the process group has {world}")
        if plan.steps == 0:
            raise RuntimeError(f"{desc}: epoch {epoch} has no samples (empty split or budget?)")
        steps = min(plan.steps, schedule.steps - schedule.steps_per_epoch * epoch)  # the step budget may end early
        it, next_it = (next_it if next_it is not None else iter(loader)), None
        totals = _train_epoch(run, it, plan, epoch, on_batch, steps)
        del it  # a truncated last epoch: stop its loader workers now
        last = epoch + 1 == epochs
        if not last and (stop_after_epoch is None or epoch < stop_after_epoch):
            # Start the next epoch's workers now: their startup (fork, store open, shuffle-buffer fill)
            # overlaps this epoch's evaluation and checkpoint. The workers take a copy of the data set
            # as it is now, so setting the epoch early is safe.
            train_set.set_epoch(epoch + 1)
            next_it = iter(loader)
        row, timing = _epoch_row(run, totals, epoch, steps)
        if rank == 0 and val_set is not None and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
            row["val_acc"] = _held_out_accuracy(model, val_set, cfg.batch_size * 2, device)
        row = _share(row, world)  # every rank returns the same history (rank 0's has the validation accuracy)
        selection.offer(model, epoch, row.get("val_acc"))
        history.append(row)
        if rank == 0:
            shown = {k: round(v, 4) for k, v in {**row, **timing}.items() if k != "epoch"}
            log.info("%s epoch %d/%d: %s", desc, epoch + 1, epochs, shown)
            timings.append(timing)
            write_run_log(run_log, timings)
        _save(run, out_dir, epoch, history, selection)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    if selection.state is not None:
        model.load_state_dict(selection.state)  # the weights of the best validation epoch
        if rank == 0:
            log.info("%s: kept epoch %d (validation top-1 %.4f)", desc, selection.best_epoch, selection.best_acc)
        return TrainResult(history, schedule, selection.best_epoch, selection.best_acc)
    final = history[-1] if history else {}
    return TrainResult(history, schedule, int(final.get("epoch", 0)), final.get("val_acc"))


# ---------------------------------------------------------------------------------------------
# the steps


def _fingerprint(
    cfg: TrainConfig, arch: str, loss_fn: LossFn, train_set: BatchSource, extra: dict[str, Any] | None
) -> dict[str, Any]:
    """What a resume state must match to be continued: the run's recipe, loss, data and code (as JSON data). Not the
    world size: a run may resume on another number of ranks (with a warning: its RNG streams restart)."""
    recipe = dataclasses.asdict(cfg)
    for key in _HOW_IT_RUNS:
        recipe.pop(key, None)
    fp = {
        "arch": arch,
        "train": recipe,
        "loss_fn": repr(loss_fn) if isinstance(loss_fn, nn.Module) else getattr(loss_fn, "__qualname__", "?"),
        "data": train_set.manifest.sha256,
        "code": resume_state.code_fingerprint(),
        **(extra or {}),
    }
    return json.loads(json.dumps(fp, sort_keys=True, default=str))


def _restore(
    folder: Path,
    run_fp: dict[str, Any],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: LossFn,
    device: torch.device,
    rank: int,
    world: int,
    selection: _Selection,
    resume: bool | str,
) -> tuple[list[dict[str, float]], int]:
    """Load the resume state in `folder` (before anything is written): weights, optimizer, this rank's RNG and loss
    state, selection. Returns (history so far, first epoch to run); ([], 0) to start over.

    `resume=True` (an explicit `--resume`): a missing state, an unreadable one or another run's is an error naming
    the keys that differ. `"auto"` (the stages' default, so a killed `dvc repro` continues): a matching state is
    continued, anything else starts over (another run's with a warning naming what differs).
    """
    strict = resume is True
    try:
        found = resume_state.read_fingerprint(folder)
    except CheckpointError as e:
        if strict:
            raise CheckpointError(f"--resume: {e}") from e
        log.warning("%s; starting over", e)
        return [], 0
    if found is None:
        if strict:
            raise FileNotFoundError(f"--resume: no resume state in {folder} to continue (run without --resume)")
        return [], 0
    differ = resume_state.differing_keys(found, run_fp)
    if differ:
        if strict:
            raise CheckpointError(
                f"--resume: the state in {folder} belongs to another run: it differs in {differ}; "
                "drop --resume to start over"
            )
        log.warning("%s holds the resume state of another run (it differs in %s): starting over", folder, differ)
        return [], 0
    state = resume_state.load_state(folder, device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # a label that hides a shape change
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"resume state {folder} does not fit the model '{run_fp.get('arch')}': {first}") from e
    opt.load_state_dict(state["optimizer"])
    ranks = state["ranks"]
    if len(ranks) != world:
        log.warning(
            "checkpoint from %d rank(s), resuming with %d: RNG streams restart from rank 0's", len(ranks), world
        )
    mine = ranks[rank] if len(ranks) == world else ranks[0]
    if isinstance(loss_fn, nn.Module):
        loss_fn.load_state_dict(mine["loss"])  # e.g. CKD's group sampler (its generator is module state)
    torch.set_rng_state(mine["torch_rng"].to("cpu"))
    selection.load(mine.get("selection"))
    log.info("resumed %s at epoch %d", folder, state["epoch"] + 1)
    return state["history"], state["epoch"] + 1


def _train_epoch(
    run: _Run,
    it: Iterator[dict[str, Any]],
    plan: EpochPlan,
    epoch: int,
    on_batch: Callable[[int, dict[str, Any]], None] | None,
    steps: int,
) -> _EpochTotals:
    """One epoch of `steps` (<= plan.steps) optimizer steps; a rank out of data takes zero-weight steps (DDP
    lockstep). Fewer steps than the plan: the schedule's step budget ends inside this epoch.

    No host sync per step: batches reach the device one ahead (`prefetch_to_device`), the epoch's sums stay
    on the device (`_EpochTotals`), and the teacher mask is read on the host. `_epoch_row` syncs once."""
    cfg, opt, timer = run.cfg, run.opt, run.timer
    it = prefetch_to_device(it, run.device)
    my_batches = plan.batches[run.rank]
    total_epochs = run.schedule.epochs if run.schedule else float(cfg.epochs or 1)
    totals = _EpochTotals(
        correct=torch.zeros((), dtype=torch.long, device=run.device),
        first_bad=torch.full((), -1, dtype=torch.long, device=run.device),
    )
    run.ddp_model.train()
    t0 = time.perf_counter()
    desc = f"{run.desc} epoch {epoch + 1}/{math.ceil(total_epochs)}"
    bar = tqdm(range(steps), desc=desc, leave=False, disable=run.rank != 0 or None)
    timer.restart()
    for step in bar:
        e = epoch + step / plan.steps  # fractional epoch: the schedule's clock
        lr = lr_at(cfg.optim, e, total_epochs)
        for g in opt.param_groups:
            g["lr"] = lr
        timer.lap("bookkeeping")
        t_wait = time.perf_counter()
        batch = next(it, None) if step < my_batches else None
        totals.waited += time.perf_counter() - t_wait
        timer.lap("wait" if step else "startup")
        if batch is None and step < my_batches:
            raise RuntimeError(f"{run.desc}: the loader ended after {step} batches; the epoch plan said {my_batches}")
        if batch is None:
            loss = _idle_loss(run)
        else:
            if on_batch is not None:
                on_batch(epoch, batch)
            parts, s, y = _batch_loss(run, batch, e)
            loss = parts["loss"]
            _guard(totals, loss, step, batch)
            if run.world > 1:
                loss = loss * (run.world / plan.active(step))  # DDP averages over all ranks; idle ones add 0
            b = len(y)
            totals.seen += b
            totals.correct += (s.detach().argmax(1) == y).sum()
            for k, v in parts.items():
                totals.sums[k] = totals.sums[k] + v.detach() * b if k in totals.sums else v.detach() * b
            timer.lap("bookkeeping")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        timer.lap("backward")
        if cfg.optim.grad_clip:
            nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optim.grad_clip)
        opt.step()
        timer.lap("optimizer")
        timer.step_done()
    if steps == plan.steps and next(it, None) is not None:
        raise RuntimeError(f"{run.desc}: the loader yielded more than the {my_batches} batches the epoch plan said")
    totals.seconds = time.perf_counter() - t0
    return totals


def _guard(totals: _EpochTotals, loss: torch.Tensor, step: int, batch: dict[str, Any]) -> None:
    """Remember the first step whose loss is not finite, on the device: the flag is read once, at the epoch's end
    (`_epoch_row`, where every rank decides together), before anything of the epoch is saved. No per-step host sync
    (on CUDA one would stall the pipeline); the price is that a diverged run finishes its epoch before it stops."""
    totals.indices.append((step, batch["index"]))  # host indices: named if this step turns out to be the bad one
    bad = ~torch.isfinite(loss.detach())
    totals.first_bad = torch.where(bad & (totals.first_bad < 0), step, totals.first_bad)


def _non_finite(run: _Run, epoch: int, step: int, index: Any, rank: int | None = None) -> NonFiniteLossError:
    """The error of a non-finite loss at (epoch, step), naming the batch's sample keys (or the rank that had it)."""
    if index is not None:
        idx = np.asarray(index).ravel()
        keys = [sample_key(int(i)) for i in idx[:8]]
        batch = f"the batch's samples {keys}{f' (first 8 of {len(idx)})' if len(idx) > 8 else ''}"
    else:
        batch = f"a batch of rank {rank}"
    return NonFiniteLossError(
        f"{run.desc}: the loss is not finite at epoch {epoch + 1}, step {step + 1}, on {batch}. Nothing of this "
        "epoch is saved and no model is written. Check the cached logits (`kdcache verify STORE`), the learning rate "
        "(optim.lr) and the loss parameters"
    )


def _idle_loss(run: _Run) -> torch.Tensor:
    """A zero-weight step's loss for a rank out of data: keeps DDP's all-reduce and the optimizer in lockstep.

    Eval mode, so the dummy input does not touch BatchNorm statistics.
    """
    run.ddp_model.eval()
    with run.ctx:
        loss = run.ddp_model(run.idle_x).float().sum() * 0.0
    run.ddp_model.train()
    return loss


def _batch_loss(
    run: _Run, batch: dict[str, torch.Tensor], epoch: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The loss parts of one batch; returns (parts, student logits (B, C), labels (B,)).

    The batch's device fields are already on the device (`prefetch_to_device`): the `.to` calls are no-ops
    there and keep direct callers (a batch straight from a loader) working."""
    device = run.device
    x = to_input(batch["image"].to(device, non_blocking=True))  # (B, C, H, W), channels_last
    y = batch["label"].to(device, non_blocking=True)  # (B,)
    run.timer.lap("input")
    if run.teacher is not None:
        with torch.no_grad(), run.ctx:
            t = run.teacher(x).float()  # (B, C) live teacher (online mode)
    elif "logits" in batch:
        t = batch["logits"].to(device, non_blocking=True)  # (B, C) cached
    else:
        t = None
    with run.ctx:
        s = run.ddp_model(x)  # (B, C)
    run.timer.lap("forward")
    groups = run.comparisons.draw(batch) if run.comparisons is not None else None  # CKD groups (pool ids)
    features = {  # the loss's teacher side, precomputed by the loader (cached logits only)
        k[len(FEATURE_PREFIX) :]: v.to(device, non_blocking=True)
        for k, v in batch.items()
        if k.startswith(FEATURE_PREFIX) and run.teacher is None
    }
    members = batch.get("members") if run.teacher is None else None  # (B, M, C) an ensemble's member logits
    mix = None  # mixed images (Mixup/CutMix views): each row's second label and its own image's weight
    if "mix_label" in batch:
        mix = (batch["mix_label"].to(device, non_blocking=True), batch["mix_lam"].to(device, non_blocking=True))
    parts = compute_loss(
        run.loss_fn,
        s,
        t,
        y,
        batch.get("has_teacher"),
        epoch,
        run.cfg.optim.label_smoothing,
        groups=groups,
        features=features or None,
        members=None if members is None else members.to(device, non_blocking=True),
        mix=mix,
    )
    run.timer.lap("loss")
    return parts, s, y


def _earlier_timings(run_log: str | Path | None, start_epoch: int) -> list[dict[str, float]]:
    """The timing rows a resumed run keeps from its run log (epochs before `start_epoch`)."""
    if run_log is None or start_epoch == 0 or not Path(run_log).exists():
        return []
    try:
        rows = json.loads(Path(run_log).read_text())
    except ValueError:  # a log is a nicety: an unreadable one starts over
        return []
    return (
        [r for r in rows if isinstance(r, dict) and r.get("epoch", 0) <= start_epoch] if isinstance(rows, list) else []
    )


def _epoch_row(run: _Run, totals: _EpochTotals, epoch: int, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """The epoch's history row (per-sample means of every loss part over all ranks, accuracy, lr, steps) and its
    timing row (seconds, samples/s, loader wait: what varies between identical runs, kept out of the history)."""
    sums = {k: float(v) for k, v in totals.sums.items()}
    mine = (totals.seen, int(totals.correct), sums, int(totals.first_bad))  # one host sync
    seen_all, correct_all, sums_all, bad = 0, 0, {}, []
    for n, ok, sm, first_bad in _gather(mine, run.world):
        seen_all += n
        correct_all += ok
        bad.append(first_bad)
        for k, v in sm.items():
            sums_all[k] = sums_all.get(k, 0.0) + v
    if max(bad) >= 0:  # every rank decides alike, before any of them saves
        r = next(i for i, b in enumerate(bad) if b >= 0)
        index = dict(totals.indices).get(bad[r]) if r == run.rank else None
        raise _non_finite(run, epoch, bad[r], index, rank=r)
    cfg = run.cfg
    total = run.schedule.epochs if run.schedule else float(cfg.epochs or 1)
    row: dict[str, float] = {"epoch": epoch + 1, "lr": lr_at(cfg.optim, min(epoch + 1, total), total)}
    if run.comparisons is not None and run.comparisons.active:
        row["distinct_comparisons"] = run.comparisons.distinct  # this rank's, so far
    row.update({f"train_{k}": v / seen_all for k, v in sums_all.items()})
    row["train_acc"] = correct_all / seen_all
    row["steps"] = steps
    timing = {
        "epoch": epoch + 1,
        "seconds": totals.seconds,
        "samples_per_s": seen_all / totals.seconds,
        "data_wait_s": totals.waited,  # rank 0's (or this process's) time blocked on the loader
    }
    return row, timing


def _held_out_accuracy(model: nn.Module, dataset: DistillDataset, batch_size: int, device: torch.device) -> float:
    """Top-1 of `model` on a held-out split (the validation split: the test split is for final reporting only).

    On a copy: predict_split runs under inference_mode, where `.to(memory_format=...)` re-creates the
    (1, C, 1, 1) normalisation buffers as inference tensors, which DDP's buffer sync (an in-place
    broadcast) then refuses. The copy costs one model's memory, once per evaluation.
    """
    logits, labels = predict_split(copy.deepcopy(model), dataset, batch_size, device)
    return topk_accuracy(logits, labels, 1)


def _save(run: _Run, out_dir: Path, epoch: int, history: list[dict[str, float]], selection: _Selection) -> None:
    """The epoch's resume state (`pipeline.training.resume`, in the run's state folder) and `history.json`; rank 0
    writes, every rank's RNG is kept."""
    loss_state = run.loss_fn.state_dict() if isinstance(run.loss_fn, nn.Module) else {}
    mine = {"torch_rng": torch.get_rng_state(), "loss": loss_state, "selection": selection.to_state()}
    ranks = _gather(mine, run.world)
    if run.rank != 0:
        return
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "history": json.loads(json.dumps(history)),
        "world_size": run.world,
        "ranks": ranks,
    }
    assert run.state_dir is not None
    resume_state.save_state(run.state_dir, state, run.fingerprint, epoch)
    atomic_write(out_dir / "history.json", lambda f: f.write((json.dumps(history, indent=1) + "\n").encode()))


def _gather(obj: Any, world: int) -> list[Any]:
    """Every rank's `obj` (a one-element list without DDP)."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _share(row: dict[str, float], world: int) -> dict[str, float]:
    """Rank 0's row on every rank."""
    if world == 1:
        return row
    box = [row]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def compute_loss(
    loss_fn: LossFn,
    s: torch.Tensor,
    t: torch.Tensor | None,
    y: torch.Tensor,
    has_teacher: torch.Tensor | np.ndarray | None,
    epoch: float,
    label_smoothing: float,
    groups: torch.Tensor | None = None,
    features: dict[str, torch.Tensor] | None = None,
    members: torch.Tensor | None = None,
    mix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The loss on rows with teacher logits; plain CE on rows without (budget `unqueried: ce`).

    s: student logits (B, C); t: teacher logits (B, C) or None (CE only, teacher training);
    features: the loss's `teacher_features` of `t`, precomputed by the loader (rows as `t`);
    members: (B, M, C) the member teachers' logits of an ensemble store (rows as `t`).
    has_teacher: (B,) bool, read on the host (the loader's mask stays there: no device sync); rows are
    picked by indexing with integer index tensors made on the host (`s[m]`), which never waits for the device
    either (a boolean-mask index would: its output size is only known on the device).
    Every loss takes the same keyword inputs (`pipeline.losses.base.DistillationLoss.forward`).
    label_smoothing: the CE's epsilon where no loss owns one (teacher training: `train_teacher.train.optim`); a
    distillation loss smooths its own CE term, and the rows without teacher logits like it.
    mix: (label2 (B,), lam (B,)) of mixed images (Mixup/CutMix views): the CE terms take the mixed target.
    """
    s = s.float()
    if t is None:
        ce = mixed_cross_entropy(s, y, mix, label_smoothing)
        return {"loss": ce, "ce": ce}
    kw = {} if mix is None else {"mix": mix}  # only a mixing store passes it (a loss that cannot mix refuses it)
    has = _host_mask(has_teacher)  # (B,) numpy bool, or None
    if has is None or has.all():
        return loss_fn(s, t, y, epoch=epoch, groups=groups, teacher_features=features, members=members, **kw)
    rest = torch.from_numpy(np.flatnonzero(~has)).to(s.device, non_blocking=True)  # (B - n_t,) row indices
    # Rows without teacher logits get the loss's own CE term, smoothed as the loss smooths its CE.
    smoothing = getattr(loss_fn, "label_smoothing", label_smoothing)
    rest_mix = None if mix is None else (mix[0][rest], mix[1][rest])
    ce_rest = mixed_cross_entropy(s[rest], y[rest], rest_mix, smoothing)
    n_t = int(has.sum())
    if n_t == 0:
        return {"loss": ce_rest, "ce_unqueried": ce_rest}
    m = torch.from_numpy(np.flatnonzero(has)).to(s.device, non_blocking=True)  # (n_t,) rows with teacher logits
    # Groups index the whole batch: the loss draws its own on the rows it gets.
    sub_features = None if features is None else {k: v[m] for k, v in features.items()}
    sub_members = None if members is None else members[m]
    if mix is not None:
        kw = {"mix": (mix[0][m], mix[1][m])}
    parts = loss_fn(s[m], t[m], y[m], epoch=epoch, teacher_features=sub_features, members=sub_members, **kw)
    frac = n_t / len(y)
    parts = dict(parts)
    parts["loss"] = frac * parts["loss"] + (1 - frac) * ce_rest
    parts["ce_unqueried"] = ce_rest
    return parts


def _host_mask(has_teacher: torch.Tensor | np.ndarray | None) -> np.ndarray | None:
    """The teacher mask (B,) as a host numpy array (`.numpy()` of a CPU tensor shares its memory, never syncs)."""
    if has_teacher is None or isinstance(has_teacher, np.ndarray):
        return has_teacher
    return (has_teacher if has_teacher.device.type == "cpu" else has_teacher.cpu()).numpy()
