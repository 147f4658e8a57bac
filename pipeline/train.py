"""One plain training loop for teachers and students alike, on one device or many (DDP).

SGD (momentum, optional Nesterov) with weight decay, linear warm-up then cosine / step / constant
learning-rate schedule evaluated per step, optional gradient clipping, bf16 autocast on CUDA and
channels_last memory format everywhere. Every epoch ends with a checkpoint (`last.pt`: model,
optimizer, epoch, history, student architecture, per-rank RNG and loss-sampler state) written
atomically, so `resume=True` continues an interrupted run to the same weights as an uninterrupted
one with the same seed (the data stream is a pure function of `(seed, epoch)`).

Teacher logits come from the batch (`"logits"`, cached) or from a live `teacher` module (online
mode, for comparison); the student never sees a teacher object in cache mode.

Under `torch.distributed` (world size > 1) the model is wrapped in DistributedDataParallel. DDP
needs every rank to run the same number of forward/backward passes, but shards are split across
ranks whole, so ranks can receive different sample counts. Every rank therefore computes the
epoch's plan (batches per rank) from the manifest (`DistillDataset.plan`) and runs
`max(batches)` steps; a rank that has run out does a zero-weight step (a dummy forward in eval
mode, loss 0) so the gradient all-reduce and the optimizer stay in lockstep, and real ranks scale
their loss by `world / active ranks`, so the averaged gradient is the mean over the ranks that had
data. No sample is dropped or repeated. Only rank 0 writes checkpoints and curves and evaluates.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from pipeline.config import OptimConfig, TrainConfig
from pipeline.evaluate import predict_split, topk_accuracy
from pipeline.loader import FEATURE_PREFIX, DistillDataset, batch_to_float, make_loader

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"


def lr_at(cfg: OptimConfig, epoch: float, total_epochs: int) -> float:
    """Learning rate at fractional `epoch`: linear warm-up, then the named schedule."""
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1e-3) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        span = max(total_epochs - cfg.warmup_epochs, 1e-8)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, (epoch - cfg.warmup_epochs) / span)))
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "constant":
        return cfg.lr
    raise ValueError(f"unknown lr schedule '{cfg.schedule}'; available: ['cosine', 'step', 'constant']")


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm/bias parameters (standard practice; decaying them only hurts).
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _loss_state(loss_fn: nn.Module) -> dict[str, Any]:
    """Sampler state of losses that draw randomness (CKD's groups), so resume replays it exactly."""
    gens = {
        name: m.generator.get_state()
        for name, m in loss_fn.named_modules()
        if isinstance(getattr(m, "generator", None), torch.Generator)
    }
    return {"generators": gens}


def _load_loss_state(loss_fn: nn.Module, state: dict[str, Any]) -> None:
    mods = dict(loss_fn.named_modules())
    for name, s in state.get("generators", {}).items():
        mods[name].generator.set_state(s)


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def arch_label(model: nn.Module) -> str:
    """A name for the model's architecture when the caller gives none: class + parameter-shape fingerprint.

    Two different architectures of one class (cnn_tiny vs cnn_small are both PlainCNN) differ in
    their parameter shapes, so the fingerprint tells them apart.
    """
    if isinstance(getattr(model, "arch", None), str):
        return model.arch
    net = getattr(model, "net", model)  # modelio.Normalized wraps the zoo network
    shapes = ";".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    return f"{type(net).__name__}#{hashlib.sha256(shapes.encode()).hexdigest()[:8]}"


def _load_checkpoint(path: Path, model: nn.Module, arch: str, device: torch.device) -> dict[str, Any]:
    """Read `path` and put its weights into `model`, refusing another architecture with both names."""
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint {path} to resume from (run without --resume)")
    state = torch.load(path, map_location=device, weights_only=False)
    found = state.get("arch")
    if found is not None and found != arch:
        raise ValueError(
            f"--resume: checkpoint {path} is of student architecture '{found}', but this run trains '{arch}'; "
            "use another output folder or drop --resume"
        )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # old checkpoint without `arch`, or a label that hides a shape change
        first = str(e).strip().splitlines()[0]
        raise ValueError(
            f"--resume: checkpoint {path} (architecture '{found or 'unrecorded'}') does not fit "
            f"the model '{arch}': {first}"
        ) from e
    return state


def _gather(obj: Any, world: int) -> list[Any]:
    """Every rank's `obj` (a one-element list without DDP)."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def train(
    model: nn.Module,
    loss_fn: Callable[..., dict[str, torch.Tensor]],
    train_set: DistillDataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    test_set: DistillDataset | None = None,
    device: torch.device | None = None,
    resume: bool = False,
    teacher: nn.Module | None = None,
    desc: str = "train",
    stop_after_epoch: int | None = None,
    arch: str | None = None,
    on_batch: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, float]]:
    """Train `model` in place; returns the per-epoch history (also written to `out_dir/history.json`).

    loss_fn(student (B, C), teacher (B, C), target (B,), epoch=float) -> {"loss": ..., parts...}.
    `stop_after_epoch` ends the run early after that (0-based) epoch (used to test resume).
    `arch` names the architecture in the checkpoint (default: `arch_label(model)`); resuming a
    checkpoint of another architecture is an error. `on_batch(epoch, batch)` sees every real batch
    (tests use it to check which samples each rank trained on).
    Under an initialised process group with world size > 1 the model trains with DDP (see module doc).
    """
    device = device or torch.device("cpu")
    rank, world = dist_info()
    main = rank == 0
    out_dir = Path(out_dir)
    cuda = device.type == "cuda"
    # channels_last on CPU too: ~1.6x faster convolutions and pooling here (oneDNN), and our
    # (B, H, W, C) -> (B, C, H, W) conversion already yields channels_last inputs.
    model.to(device, memory_format=torch.channels_last)
    if teacher is not None:
        teacher.eval().to(device, memory_format=torch.channels_last)
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)
    arch = arch or arch_label(model)
    opt = make_optimizer(model, cfg.optim)
    history: list[dict[str, float]] = []
    start_epoch = 0
    ckpt_path = out_dir / CHECKPOINT
    if resume:
        state = _load_checkpoint(ckpt_path, model, arch, device)  # before anything is written
        opt.load_state_dict(state["optimizer"])
        ranks = state.get("ranks") or [{"torch_rng": state["torch_rng"], "loss": state.get("loss", {})}]
        mine = ranks[rank] if len(ranks) == world else ranks[0]
        if len(ranks) != world:
            log.warning(
                "checkpoint from %d rank(s), resuming with %d: RNG streams restart from rank 0's", len(ranks), world
            )
        if isinstance(loss_fn, nn.Module):
            _load_loss_state(loss_fn, mine.get("loss", {}))
        torch.set_rng_state(mine["torch_rng"])
        history = state["history"]
        start_epoch = state["epoch"] + 1
        log.info("resumed %s at epoch %d", ckpt_path, start_epoch)
    else:
        torch.manual_seed(cfg.seed)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)

    net: nn.Module = model
    if world > 1:
        # Broadcasts rank 0's weights at construction, then all-reduces (averages) gradients every step.
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    loader = make_loader(train_set, cfg.batch_size, cfg.workers)
    comparisons = ComparisonTracker(loss_fn)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (cuda and cfg.amp) else None
    h, w, c = train_set.manifest.image_shape
    idle_x = torch.zeros(1, c, h, w, device=device).contiguous(memory_format=torch.channels_last)  # (1, C, H, W)
    next_it: Any = None  # the next epoch's loader, started before this epoch's evaluation and checkpoint
    for epoch in range(start_epoch, cfg.epochs):
        if next_it is None:
            train_set.set_epoch(epoch)
        plan = train_set.plan(cfg.batch_size, loader.num_workers)
        if len(plan.batches) != world:
            raise RuntimeError(f"data set split for {len(plan.batches)} rank(s), but the process group has {world}")
        steps, my_batches = plan.steps, plan.batches[rank]
        if steps == 0:
            raise RuntimeError(f"{desc}: epoch {epoch} has no samples (empty split or budget?)")
        net.train()
        sums: dict[str, torch.Tensor] = {}  # part -> sum over samples, on device (no per-step host sync)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        waited = 0.0  # seconds blocked on the loader: ~0 when the data path keeps up
        t0 = time.perf_counter()
        it, next_it = (next_it if next_it is not None else iter(loader)), None
        bar = tqdm(
            range(steps), desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None if main else True
        )
        for step in bar:
            e = epoch + step / steps
            lr = lr_at(cfg.optim, e, cfg.epochs)
            for g in opt.param_groups:
                g["lr"] = lr
            t_wait = time.perf_counter()
            batch = next(it, None) if step < my_batches else None
            waited += time.perf_counter() - t_wait
            if batch is None and step < my_batches:
                raise RuntimeError(f"{desc}: the loader ended after {step} batches; the epoch plan said {my_batches}")
            if batch is None:
                # This rank is out of data: a zero-weight step keeps DDP's all-reduce and the optimizer in
                # lockstep. Eval mode so the dummy input does not touch BatchNorm statistics.
                net.eval()
                with amp if amp is not None else _null():
                    loss = net(idle_x).float().sum() * 0.0
                net.train()
            else:
                if on_batch is not None:
                    on_batch(epoch, batch)
                x = batch_to_float(batch["image"].to(device, non_blocking=True))  # (B, C, H, W), channels_last
                y = batch["label"].to(device, non_blocking=True)  # (B,)
                if teacher is not None:
                    with torch.no_grad(), amp if amp is not None else _null():
                        t = teacher(x).float()  # (B, C) live teacher (online mode)
                elif "logits" in batch:
                    t = batch["logits"].to(device, non_blocking=True)  # (B, C) cached
                else:
                    t = None
                with amp if amp is not None else _null():
                    s = net(x)  # (B, C)
                groups = comparisons.draw(batch)  # CKD groups, identified by pool sample-view ids
                feats = {  # the loss's teacher side, precomputed by the loader (cached logits only)
                    k[len(FEATURE_PREFIX) :]: v.to(device, non_blocking=True)
                    for k, v in batch.items()
                    if k.startswith(FEATURE_PREFIX) and teacher is None
                }
                parts = _compute_loss(
                    loss_fn,
                    s,
                    t,
                    y,
                    batch.get("has_teacher"),
                    e,
                    cfg.optim.label_smoothing,
                    groups=groups,
                    features=feats or None,
                )
                loss = parts["loss"]
                if world > 1:
                    loss = loss * (world / plan.active(step))  # DDP averages over all ranks; idle ones add 0
                b = len(y)
                seen += b
                correct += (s.detach().argmax(1) == y).sum()
                for k, v in parts.items():
                    sums[k] = sums[k] + v.detach() * b if k in sums else v.detach() * b
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
        if next(it, None) is not None:
            raise RuntimeError(f"{desc}: the loader yielded more than the {my_batches} batches the epoch plan said")
        del it
        if epoch + 1 < cfg.epochs and (stop_after_epoch is None or epoch < stop_after_epoch):
            # Start the next epoch's workers now: their startup (fork, store open, shuffle-buffer fill,
            # ~0.1 s) overlaps this epoch's evaluation and checkpoint. The workers take a copy of the
            # data set as it is now, so setting the epoch early is safe.
            train_set.set_epoch(epoch + 1)
            next_it = iter(loader)
        dt_epoch = time.perf_counter() - t0
        mine = (seen, int(correct), {k: float(v) for k, v in sums.items()})
        seen_all, correct_all, sums_all = 0, 0, {}
        for n, ok, sm in _gather(mine, world):
            seen_all += n
            correct_all += ok
            for k, v in sm.items():
                sums_all[k] = sums_all.get(k, 0.0) + v
        row: dict[str, float] = {"epoch": epoch + 1, "lr": lr_at(cfg.optim, epoch + 1, cfg.epochs)}
        if comparisons.active:
            row["distinct_comparisons"] = comparisons.distinct  # this rank's, so far
        row.update({f"train_{k}": v / seen_all for k, v in sums_all.items()})
        row["train_acc"] = correct_all / seen_all
        row["samples_per_s"] = seen_all / dt_epoch
        row["steps"] = steps
        row["data_wait_s"] = waited  # rank 0's (or this process's) time blocked on the loader
        if (
            main
            and test_set is not None
            and (epoch + 1 == cfg.epochs or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0))
        ):
            # On a copy: predict_split runs under inference_mode, where `.to(memory_format=...)` re-creates
            # the (1, C, 1, 1) normalisation buffers as inference tensors, which DDP's buffer sync (an
            # in-place broadcast) then refuses. The copy costs one model's memory, once per evaluation.
            logits, labels = predict_split(copy.deepcopy(model), test_set, cfg.batch_size * 2, device)
            row["test_acc"] = topk_accuracy(logits, labels, 1)
        if world > 1:  # every rank returns the same history (rank 0's has the test accuracy)
            box = [row]
            dist.broadcast_object_list(box, src=0)
            row = box[0]
        history.append(row)
        if main:
            log.info("%s epoch %d/%d: %s", desc, epoch + 1, cfg.epochs, {k: round(v, 4) for k, v in row.items()})
        ranks = _gather({"torch_rng": torch.get_rng_state(), "loss": _rank_loss_state(loss_fn)}, world)
        if main:
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch,
                "history": history,
                "arch": arch,
                "world_size": world,
                "torch_rng": ranks[0]["torch_rng"],
                "loss": ranks[0]["loss"],
                "ranks": ranks,
            }
            _atomic_save(state, ckpt_path)
            (out_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    return history


def _rank_loss_state(loss_fn: Callable[..., Any]) -> dict[str, Any]:
    return _loss_state(loss_fn) if isinstance(loss_fn, nn.Module) else {}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


class ComparisonTracker:
    """Counts the distinct comparisons a CKD student sees over training (budget runs, issue 6).

    With a queried pool (batches carry `pool_id`, the sample-view's identity), the loop draws CKD's
    groups from the loss's own seeded sampler, the same draw the loss would make itself, so the stream
    and resume state are unchanged, drops groups that hold one sample-view twice, and records each
    group as its tuple of pool ids (A first, then B: an ordered comparison). Inactive for losses
    without comparisons or without a pool.
    """

    def __init__(self, loss_fn: Any) -> None:
        mods = loss_fn.modules() if isinstance(loss_fn, nn.Module) else []
        samplers = (m for m in mods if getattr(m, "accepts_groups", False) and hasattr(m, "sample_groups"))
        self.sampler = next(samplers, None)
        self.seen: set[tuple[int, ...]] = set()
        self.active = False

    def draw(self, batch: dict[str, Any]) -> torch.Tensor | None:
        if self.sampler is None or "pool_id" not in batch:
            return None
        self.active = True
        groups = self.sampler.sample_groups(len(batch["label"]))  # (G, k) row indices
        ids = batch["pool_id"][groups.cpu()]  # (G, k) pool sample-view ids
        # A small pool repeats a sample-view within a batch; a group holding one twice compares a sample
        # with itself (zero difference, no signal): drop those, count the rest.
        ok = (ids.sort(dim=1).values.diff(dim=1) != 0).all(dim=1)  # (G,)
        groups, ids = groups[ok.to(groups.device)], ids[ok]
        self.seen.update(map(tuple, ids.tolist()))
        return groups

    @property
    def distinct(self) -> int:
        return len(self.seen)


def _compute_loss(
    loss_fn: Callable[..., dict[str, torch.Tensor]],
    s: torch.Tensor,
    t: torch.Tensor | None,
    y: torch.Tensor,
    has_teacher: torch.Tensor | None,
    epoch: float,
    label_smoothing: float,
    groups: torch.Tensor | None = None,
    features: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The loss on rows with teacher logits; plain CE on rows without (budget `unqueried: ce`).

    features: the loss's `teacher_features` of `t`, precomputed by the loader (rows as `t`).
    """
    s = s.float()
    if t is None:
        ce = nn.functional.cross_entropy(s, y, label_smoothing=label_smoothing)
        return {"loss": ce, "ce": ce}
    kw: dict[str, Any] = {}
    if features is not None:
        kw["teacher_features"] = features
    if has_teacher is None or bool(has_teacher.all()):
        if groups is not None:
            kw["groups"] = groups
        return loss_fn(s, t, y, epoch=epoch, **kw)
    m = has_teacher.to(s.device)
    n_t = int(m.sum())
    ce_rest = nn.functional.cross_entropy(s[~m], y[~m], label_smoothing=label_smoothing)
    if n_t == 0:
        return {"loss": ce_rest, "ce_unqueried": ce_rest}
    if features is not None:
        kw["teacher_features"] = {k: v[m] for k, v in features.items()}
    parts = loss_fn(s[m], t[m], y[m], epoch=epoch, **kw)
    frac = n_t / len(y)
    parts = dict(parts)
    parts["loss"] = frac * parts["loss"] + (1 - frac) * ce_rest
    parts["ce_unqueried"] = ce_rest
    return parts
