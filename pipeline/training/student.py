"""One student run of the distill matrix: `run_student` is what `stages.distill` (and every experiment) calls.

A run is (teacher, loss, budget, seed): the student trains on the teacher's cached logits with that
loss, on all cached sample-views or on the first `budget` teacher calls of the store's selection
order, and its checkpoint, metadata and training curves are written where `Layout` says.

    student = StudentRun("resnet", "dist", budget=1000, seed=1)
    run_student(manifest, cfg, student, layout)   # -> data/students/resnet-dist-1000-1/model.safetensors + curves
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.cache.budget import BudgetSpec, parse_budget
from pipeline.cache.store import LogitStore
from pipeline.config import ConfigError, DistillConfig, naming, student_id
from pipeline.data.shards import Manifest
from pipeline.data.views import ViewRecipe, view_manifest
from pipeline.layout import STUDENT_MODEL, Layout
from pipeline.lock import exclusive, reading
from pipeline.losses import LossConfigError, build_loss
from pipeline.models.checkpoint import atomic_write, load_model, save_model
from pipeline.models.registry import build_for
from pipeline.models.usercode import code_of
from pipeline.runtime import pick_device, rank_world, seed_everything, set_threads
from pipeline.training import resume as resume_state
from pipeline.training.dataset import DistillDataset
from pipeline.training.loop import train
from pipeline.training.pool import QueriedPool
from pipeline.training.source import BatchSource
from pipeline.training.validate import held_out

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudentRun:
    """One item of the distill matrix."""

    teacher: str
    loss: str
    budget: str | int = "full"
    seed: int = 0

    @property
    def sid(self) -> str:
        return student_id(self.teacher, self.loss, self.budget, self.seed)

    @property
    def is_full(self) -> bool:
        return str(self.budget) == "full"


def budget_mask(store: LogitStore, labels: np.ndarray | None, budget: str | int) -> np.ndarray:
    """(N, V) sample-views a student may use: the first `budget` calls of the store's selection order.

    A store written in rounds (active queries) records that order itself (`LogitStore.query_order`): it cannot
    be recomputed from the labels, since each round depended on a student.
    """
    queried = store.queried()
    if str(budget) == "full":
        return queried
    assert labels is not None
    n, order = parse_budget(budget), store.query_order()
    if order is None:
        mask = BudgetSpec.from_attrs(store.attrs.get("budget")).prefix(budget).mask(labels, store.views)
    else:
        mask = (order >= 0) & (order < n)
    if (mask & ~queried).any() or int(mask.sum()) < min(int(n or 0), queried.size):
        raise ConfigError(
            f"budget {budget} needs teacher calls the store {store.path} never made (it holds {int(queried.sum())}); "
            f"raise {'query.<name>.budget' if order is not None else 'teach.budget'} or lower the distill budget"
        )
    return mask


def build_train_source(
    cfg: DistillConfig,
    manifest: Manifest,
    store_path: str | Path,
    allowed: np.ndarray,
    run: StudentRun,
    teacher_features: Any = None,
    members: bool = False,
) -> BatchSource:
    """The student's training data: the in-memory queried pool for budget runs, else the shard stream.

    A budget run's few queried sample-views live in memory; every epoch draws the same number of
    samples as a full run would, so small budgets train for the same schedule. With
    `distill.unqueried: ce` a budget run streams every sample instead, with CE on the unqueried ones.
    `members`: join an ensemble store's member logits too (for a loss that reads them).
    """
    if not run.is_full and cfg.unqueried == "drop":
        return QueriedPool(
            manifest,
            "train",
            store_path,
            allowed,
            seed=run.seed,
            epoch_samples=cfg.pool_epoch_samples,
            teacher_features=teacher_features,
            members=members,
        )
    return DistillDataset(
        manifest,
        "train",
        store_path,
        seed=run.seed,
        shuffle_buffer=cfg.train.shuffle_buffer,
        allowed=allowed,
        unqueried=cfg.unqueried,
        teacher_features=teacher_features,
        members=members,
    )


def wants_members(loss_fn: Any, store: LogitStore, run: StudentRun, teacher_source: str) -> bool:
    """Whether the loader joins the store's member logits: exactly when the loss reads them and the store has them.

    An ensemble store (attrs `ensemble`) has no model to run online; one built without its members cannot feed
    a loss that reads them (an error naming the fix). A single teacher's store is a one-member ensemble for such a
    loss (`mtkd` is then `kd`), so a distill matrix may cross every teacher with it.
    """
    ensemble = store.attrs.get("ensemble")
    if ensemble and teacher_source == "online":
        raise ConfigError(
            f"teacher '{run.teacher}' is an ensemble of stores {ensemble.get('members')}: there is no model to run "
            "online; use distill.teacher_source: cache"
        )
    if "members" not in loss_fn.reads:
        return False
    if store.member_names:
        return True
    if ensemble:
        raise ConfigError(
            f"loss '{run.loss}' distils from each member teacher, but ensemble '{run.teacher}' was built without "
            f"its member logits: set ensembles.{run.teacher}.keep_members: true (or use a loss on the combined logits)"
        )
    log.info("loss %s on the single teacher %s: one member (the teacher itself)", run.loss, run.teacher)
    return False


def student_loss(cfg: DistillConfig, loss: str) -> Any:
    """The loss `loss` with its `distill.loss_params` (errors name the key to fix)."""
    if loss not in cfg.loss_params:
        raise ConfigError(
            f"no parameters for loss '{loss}': add distill.loss_params.{loss} to params.yaml "
            f"(configured: {sorted(cfg.loss_params)})"
        )
    try:
        return build_loss(loss, **(cfg.loss_params[loss] or {}))
    except LossConfigError as e:  # name the key: the loss only knows its own parameter names
        raise ConfigError(f"distill.loss_params.{loss}: {e}", where=f"distill.loss_params.{loss}") from e


def fit_student(
    manifest: Manifest,
    cfg: DistillConfig,
    loss_fn: Any,
    train_set: BatchSource,
    out: Path,
    *,
    seed: int,
    device: torch.device,
    resume: bool | Literal["auto"] = False,
    state_dir: str | Path | None = None,
    fingerprint: dict[str, Any] | None = None,
    teacher: torch.nn.Module | None = None,
    desc: str = "student",
    run_log: str | Path | None = None,
) -> tuple[torch.nn.Module, Any]:
    """A fresh `distill.student` (seeded) trained on `train_set` with `distill.train` and `seed`, the checkpoint kept
    by validation on the `val` split; returns (model, `TrainResult`). What every student run trains through: the
    distill stage's and an active query round's. `resume`, `state_dir`, `fingerprint`: as `train`'s (the student
    recipe's own keys are added here)."""
    tcfg = dataclasses.replace(cfg.train, seed=seed)
    # checkpoint selection through the store's eval transform (view 0); the test split is for final reporting only
    val_set = held_out(manifest, "val", train_set.recipe)
    seed_everything(seed)
    with naming("distill.student"):
        model = build_for(cfg.student, view_manifest(manifest, train_set.recipe), cfg.student_preprocess)
    result = train(
        model,
        loss_fn,
        train_set,
        tcfg,
        out,
        val_set=val_set,
        device=device,
        resume=resume,
        state_dir=state_dir,
        fingerprint={"student_preprocess": cfg.student_preprocess, **code_of(cfg.student), **(fingerprint or {})},
        teacher=teacher,
        desc=desc,
        arch=cfg.student,
        run_log=run_log,
    )
    return model, result


def run_fingerprint(cfg: DistillConfig, run: StudentRun, store: LogitStore) -> dict[str, Any]:
    """What makes a distill run this run, besides the training recipe `train` adds: the loss and its parameters, the
    budget, how teacher logits reach it, and the store's content (its identity, not its path)."""
    identity = json.dumps(store.attrs.get("identity"), sort_keys=True).encode()
    return {
        "loss": run.loss,
        "loss_params": cfg.loss_params.get(run.loss),
        "budget": str(run.budget),
        "teacher_source": cfg.teacher_source,
        "unqueried": cfg.unqueried,
        "pool_epoch_samples": cfg.pool_epoch_samples,
        "store": hashlib.sha256(identity).hexdigest(),
    }


def selection_record(store: LogitStore, allowed: np.ndarray) -> dict[str, Any] | None:
    """How the teacher calls a student used were chosen (its record's `student.query`), None for a full store.

    Active stores (written in rounds): strategy `active`, the score, the rounds the calls come from and the
    student steps spent on choosing them; budget stores: the fixed strategy and its seed.
    """
    budget = store.attrs.get("budget") or {}
    active = store.attrs.get("active")
    if active:
        rounds_of = store.query_rounds()[allowed]  # (k,) the round of each call used
        used = int(rounds_of.max()) + 1 if len(rounds_of) else 0
        log_rows = store.group.attrs.get("rounds") or []
        return {
            "strategy": "active",
            "score": active.get("score"),
            "rounds": used,
            "selection_steps": int(sum(r.get("student_steps", 0) for r in log_rows[:used])),
            "seed": budget.get("seed"),
        }
    if budget.get("n") is None:
        return None
    return {"strategy": budget.get("strategy", "random"), "seed": budget.get("seed", 0)}


def run_student(
    manifest: Manifest,
    cfg: DistillConfig,
    run: StudentRun,
    layout: Layout,
    *,
    store: str | Path | None = None,
    out_dir: str | Path | None = None,
    curves: str | Path | None = None,
    resume: bool | Literal["auto"] = "auto",
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Train one student; rank 0 writes `model.safetensors` (with its metadata) and the curves. Returns the metadata.

    store / out_dir / curves override the layout's paths (experiments that train on another store).
    `resume`: "auto" continues this run's resume state if a killed run left one (`Layout.resume_state`, outside
    DVC's outputs), True insists on it (`--resume`), False starts over (`--restart`).
    One writer per student folder (`pipeline.lock.exclusive`, rank 0) and the store held for reading (`reading`: a
    `teach --force` on it is refused meanwhile). Under torchrun every rank calls this; the process group must
    already be initialised.
    """
    rank, _ = rank_world()
    out = Path(out_dir or layout.student(run.sid))
    store_path = Path(store or layout.store(run.teacher))
    owner = exclusive(out, f"student folder {out}") if rank == 0 else contextlib.nullcontext()
    with owner, reading(store_path, f"logit store {store_path}"):
        return _run_student(manifest, cfg, run, layout, store_path, out, curves, resume, device, rank)


def _run_student(
    manifest: Manifest,
    cfg: DistillConfig,
    run: StudentRun,
    layout: Layout,
    store_path: Path,
    out: Path,
    curves: str | Path | None,
    resume: bool | Literal["auto"],
    device: torch.device | None,
    rank: int,
) -> dict[str, Any]:
    loss_fn = student_loss(cfg, run.loss)
    if cfg.teacher_source not in ("cache", "online"):
        raise ConfigError(f"distill.teacher_source must be 'cache' or 'online', got '{cfg.teacher_source}'")
    train_store = LogitStore(store_path, "train", manifest)
    mixing = ViewRecipe.from_dict(train_store.view_recipe).mix is not None
    if mixing and not loss_fn.mixes:
        raise ConfigError(
            f"distill loss {run.loss!r} reads the hard target, but the store {store_path} holds mixed views "
            "(Mixup/CutMix: two labels per image): pick a loss that mixes (ce, kd, dist, cmkd, ckd, lskd) or a "
            "store taught without mixing (teach.augment mixup_alpha/cutmix_alpha 0)"
        )
    labels = None if run.is_full else manifest.iter_labels("train")
    allowed = budget_mask(train_store, labels, run.budget)
    set_threads(cfg.train.threads)
    seed_everything(run.seed)
    # The loss's teacher side (CMKD's soft ranks...) depends on the cached logits alone: the loader's worker
    # computes it per batch, off the training step (identical results, tested).
    features = loss_fn.teacher_features if "teacher_features" in loss_fn.reads else None
    if cfg.teacher_source == "online":
        features = None
    members = wants_members(loss_fn, train_store, run, cfg.teacher_source)
    train_set = build_train_source(cfg, manifest, store_path, allowed, run, teacher_features=features, members=members)
    teacher = None
    if cfg.teacher_source == "online":
        if (train_store.teacher or {}).get("arch") == "endpoint":
            raise ConfigError(
                f"teacher '{run.teacher}' is a live endpoint: asking it on every training step would pay for every "
                "epoch's calls again; use distill.teacher_source: cache (its answers are in the store)"
            )
        teacher, _ = load_model(layout.teacher_checkpoint(run.teacher), data=manifest)
    # A killed run's state survives DVC's deletion of the outputs; an experiment's own out_dir keeps it inside.
    state_dir = layout.resume_state("distill", run.sid) if out == layout.student(run.sid) else out / "resume"
    model, result = fit_student(
        manifest,
        cfg,
        loss_fn,
        train_set,
        out,
        seed=run.seed,
        device=device or pick_device(),
        resume=resume,
        state_dir=state_dir,
        fingerprint=run_fingerprint(cfg, run, train_store),
        teacher=teacher,
        desc=run.sid,
        run_log=layout.run_log("distill", run.sid) if rank == 0 else None,
    )
    meta = {
        "student_id": run.sid,
        "teacher": run.teacher,
        "loss": run.loss,
        "budget": str(run.budget),
        "seed": run.seed,
        "teacher_calls": int(allowed.sum()),
        "train_samples": train_set.pool_size() if isinstance(train_set, QueriedPool) else train_set.num_samples(),
        "distinct_comparisons": result.history[-1].get("distinct_comparisons"),
        "store_teacher": train_store.teacher,
        "store": str(store_path),  # what `evaluate` compares the student with by default
        **result.summary(),  # schedule, selected epoch, its validation top-1
    }
    query = selection_record(train_store, allowed)
    if query is not None:  # how the calls were chosen (budget and active stores); a full store has nothing to say
        meta["query"] = query
    if rank != 0:
        return meta  # only rank 0 writes outputs
    save_model(out / STUDENT_MODEL, model.cpu(), cfg.student, extra=meta)
    curves_path = Path(curves or layout.curves(run.sid))
    atomic_write(curves_path, lambda f: f.write((json.dumps(result.history, indent=1) + "\n").encode()))
    resume_state.discard(state_dir)  # finished: nothing to resume
    log.info("student %s done: kept epoch %d, validation top-1 %s", run.sid, result.selected_epoch, result.val_acc)
    return meta
