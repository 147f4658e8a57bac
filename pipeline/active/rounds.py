"""Active teacher queries: the `query@<name>` stage's library side (`query_store`, `run_query`).

A teacher that is slow or metered answers only `budget` sample-views of the train split, and which ones matters
as much as how many. The calls are made in rounds:

1. round 0 asks about `initial` sample-views in a fixed order (`seed_strategy`: `pipeline.cache.budget`);
2. round r >= 1 trains the distill student on the calls made so far (`pipeline.training.student.fit_student`:
   the same loss, pool and loop as `distill`, with `steps` optimizer steps), scores every sample-view not yet
   selected -- every view of every row, each on the exact augmented image the teacher would see
   (`ViewRecipe.apply`) -- with that student alone (`pipeline.active.scores`), and asks the teacher about the
   `per_round` best; the last round takes what is left of the budget.

The teacher is run only on the selected sample-views (and, unbudgeted as in `teach`, on the other splits). The
store is an ordinary logit store (`data/logits/<name>.zarr`, students use it like any teacher's) that also
records, per train sample-view, the round that selected it (`round`) and the position of its call (`order`), so
a distill budget n below `budget` is the first n calls, and the train group's `rounds` attribute holds each
round's calls, pool and student steps (the cost of choosing: `kdcache inspect` shows it).

Resuming. A selection is written into the store *before* the teacher is called on it, and a call counts as made
once its logits are written (`StoreWriter.add_calls`), so a killed run restarts in the round it was in: it keeps
every call made, makes the ones it still owes, and retrains a round student only if it was killed before the
round's selection was recorded (from the epoch checkpoint it was at, in `<store>.rounds/`). A raised budget
reopens the finished store and goes on from its last round (with `reuse`, as `dvc repro` runs it): every round
is a pure function of the rounds before it, so the result is byte for byte the store a fresh run with the larger
budget writes, and budget n is a prefix of budget m > n. Wall-clock times per round go to the run log only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn

from pipeline.active.scores import NEEDS_FEATURES, select
from pipeline.cache.budget import resolve_budget, selection_order
from pipeline.cache.store import StoreSpec, StoreWriter, same_content
from pipeline.cache.teach import (
    ShardBatch,
    Teacher,
    build_spec,
    journal_path,
    open_teacher,
    run_teach,
    shard_logits,
    view_recipes,
)
from pipeline.config import ConfigError, DistillConfig, QuerySpec, TeachConfig, TeacherSpec, naming
from pipeline.data.shards import Manifest, read_shard, sample_key, take_images
from pipeline.data.views import MixSource, ViewRecipe
from pipeline.layout import partial_path
from pipeline.lock import exclusive
from pipeline.models.predict import classifier_layer, predict_arrays, predict_features
from pipeline.models.registry import build_for
from pipeline.runtime import pick_device, set_threads, utc_now, write_run_log
from pipeline.training.pool import QueriedPool
from pipeline.training.student import fit_student, student_loss

log = logging.getLogger(__name__)

SPLIT = "train"  # the split the budget applies to (as in `teach`)
SCORE_CHUNK = 8192  # sample-views augmented and scored at a time (bounds the memory of one view's images)


def plan_rounds(budget: int, initial: int, per_round: int) -> list[int]:
    """Calls per round: `initial`, then `per_round` until `budget` is reached (the last round takes the rest)."""
    if per_round < 1 or initial < 1:
        raise ConfigError(f"initial ({initial}) and per_round ({per_round}) must be positive integers")
    sizes = [min(initial, budget)]
    while sum(sizes) < budget:
        sizes.append(min(per_round, budget - sum(sizes)))
    return sizes


def rounds_path(store: str | Path) -> Path:
    """Where the round students' epoch checkpoints live while a store is written: `<store>.rounds/` (not an output)."""
    store = Path(store)
    return store.with_name(store.name + ".rounds")


def query_store(
    manifest: Manifest,
    checkpoint: str | Path,
    out: str | Path,
    spec: QuerySpec,
    teach: TeachConfig,
    distill: DistillConfig,
    name: str,
    *,
    force: bool = False,
    reuse: bool = False,
    run_log: str | Path | None = None,
    endpoint: TeacherSpec | None = None,
) -> Path:
    """The `query@<name>` stage: ask teacher `spec.teacher` (its checkpoint) about the sample-views rounds of the
    distill student choose, into the store at `out`; returns its path. See `run_query`. `endpoint`: the teacher's
    params entry when it is a live endpoint (its checkpoint is then the endpoint's record)."""
    if force:
        shutil.rmtree(journal_path(out), ignore_errors=True)
    recipe = view_recipes(teach, manifest)[SPLIT]
    with naming(f"teachers.{spec.teacher}"):  # checks the teacher fits the data set before any work
        model, identity = open_teacher(Path(checkpoint), manifest, spec.teacher, endpoint, out, recipe)
    path = run_query(
        manifest, model, out, spec, teach, distill, name, teacher=identity, force=force, reuse=reuse, run_log=run_log
    )
    journal = getattr(model, "journal", None)
    if journal is not None:  # every answer is in the store now
        journal.discard()
    return path


def run_query(
    manifest: Manifest,
    model: Teacher,
    out: str | Path,
    spec: QuerySpec,
    teach: TeachConfig,
    distill: DistillConfig,
    name: str,
    *,
    teacher: dict[str, Any],
    force: bool = False,
    reuse: bool = False,
    run_log: str | Path | None = None,
    device: torch.device | None = None,
) -> Path:
    """Fill the store at `out` with the teacher's answers on the actively chosen sample-views, round by round.

    model: the teacher (a module, or any callable (B, H, W, C) uint8 -> (B, C) logits); teacher: its identity in
    the store. The store's layout (views, dtype, compressor, chunks, top-k) is `teach`'s; the round students are
    `distill`'s student with its `train` recipe, `spec.steps` steps and loss `spec.loss`. `force` starts over;
    `reuse` reopens a finished store whose budget was raised (anything else is recomputed). Holds the store's
    writer lock throughout; per-round wall-clock times go to `run_log`.
    """
    out = Path(out)
    device = device or pick_device()
    with exclusive(out, f"logit store {out}"):
        started, t0 = utc_now(), time.perf_counter()
        job = _Job(manifest, model, out, spec, teach, distill, name, teacher, device)
        job.check_inputs()  # bad input fails before the teacher answers anything
        job.open(force=force, reuse=reuse)
        kept = job.calls_made()
        job.other_splits()
        timings = job.rounds(_earlier_rounds(run_log))
        made = job.calls_made() - kept
        path = job.finish()
        record = {"store": str(path), "calls_kept": kept, "calls_made": made, "rounds": timings}
        record.update(started=started, finished=utc_now(), seconds=round(time.perf_counter() - t0, 3))
        write_run_log(run_log, record)
    return path


def _earlier_rounds(run_log: str | Path | None) -> dict[int, dict[str, Any]]:
    """The timing rows of an earlier (killed) run of this store, by round: a resumed run keeps those it skips."""
    if run_log is None or not Path(run_log).is_file():
        return {}
    try:
        rows = json.loads(Path(run_log).read_text()).get("rounds", [])
    except (ValueError, AttributeError):  # a log is a nicety: an unreadable one starts over
        return {}
    return {int(r["round"]): r for r in rows if isinstance(r, dict) and "round" in r}


class _Job:
    """One run of `run_query`: the store being written, the train images in memory and the round loop."""

    def __init__(
        self,
        manifest: Manifest,
        model: Teacher,
        out: Path,
        spec: QuerySpec,
        teach: TeachConfig,
        distill: DistillConfig,
        name: str,
        teacher: dict[str, Any],
        device: torch.device,
    ) -> None:
        self.manifest, self.model, self.out, self.spec, self.name = manifest, model, out, spec, name
        self.teach, self.device = teach, device
        # The round students: the distill student and recipe, `spec.steps` optimizer steps each.
        length = {"steps": spec.steps, "epochs": None} if spec.steps else {}
        self.distill = dataclasses.replace(distill, train=dataclasses.replace(distill.train, **length))
        self.recipes = view_recipes(teach, manifest)
        split = manifest.split(SPLIT)
        self.views = self.recipes[SPLIT].views
        self.budget = resolve_budget(spec.budget, split.n * self.views)  # above the split: clamped, with a warning
        self.sizes = plan_rounds(self.budget, spec.initial, spec.per_round)
        self.store_spec = self._store_spec(teacher)
        self.writer: StoreWriter | None = None

    # -- set-up ---------------------------------------------------------------------------------

    def _store_spec(self, teacher: dict[str, Any]) -> StoreSpec:
        t, s, d = self.teach, self.spec, self.distill
        base = build_spec(
            self.manifest,
            teacher,
            self.recipes,
            dtype=t.dtype,
            topk=t.topk,
            compressor=t.compressor,
            chunk_rows=t.chunk_rows,
        )
        # What the selection depends on, besides the teacher, the data and the views: a store made with any other
        # value is another store (and a partial one is not resumed).
        active = {
            "initial": min(s.initial, self.budget),
            "per_round": s.per_round,
            "seed_strategy": s.seed_strategy,
            "score": s.score,
            "candidates": s.candidates,
            "loss": s.loss,
            "loss_params": d.loss_params.get(s.loss) or {},
            "student": d.student,
            "student_preprocess": d.student_preprocess,
            "train": dataclasses.asdict(d.train),
            "pool_epoch_samples": d.pool_epoch_samples,
        }
        extra = {"budget": {"n": self.budget, "strategy": "active", "seed": s.seed}, "active": active}
        return dataclasses.replace(base, extra=extra, ordered=(SPLIT,))

    def check_inputs(self) -> None:
        """The round loss and, for a score on features, the student's classifier layer: checked before any call."""
        student_loss(self.distill, self.spec.loss)
        if self.spec.score in NEEDS_FEATURES:
            with naming("distill.student"):
                student = build_for(self.distill.student, self.manifest, self.distill.student_preprocess)
            if classifier_layer(student) is None:
                raise ConfigError(
                    f"query.{self.name}.score: '{self.spec.score}' compares the student's penultimate features, but "
                    f"the student {self.distill.student} has no identifiable classifier layer (an nn.Linear named "
                    "fc, classifier, linear, head or heads, or timm's get_classifier()); use score: margin or entropy",
                    where=f"query.{self.name}.score",
                )

    def open(self, *, force: bool, reuse: bool) -> None:
        """Create, resume or (a raised budget, with `reuse`) reopen the store; see the module doc."""
        partial = partial_path(self.out)
        if not force and self.out.exists() and reuse:
            if self._extends(dict(zarr.open_group(str(self.out), mode="r").attrs)):
                log.info("reopening %s: its budget grew to %d calls; on from its last round", self.out, self.budget)
                shutil.rmtree(partial, ignore_errors=True)
                os.replace(self.out, partial)
                self._adopt(partial)
            else:
                log.info("existing store %s is not a raised budget of this query: recomputing", self.out)
                shutil.rmtree(self.out)
        elif not force and partial.exists():
            try:
                attrs = dict(zarr.open_group(str(partial), mode="r").attrs)
            except Exception:  # not a store: StoreWriter says so
                attrs = {}
            if self._extends(attrs, complete=False):
                self._adopt(partial)  # a killed run of a smaller budget: its calls are the start of this one's
        self.writer = StoreWriter(self.out, self.store_spec, force=force)
        work = rounds_path(self.out)
        key = self._work_key()
        if force or ((work / "identity").is_file() and (work / "identity").read_text() != key):
            shutil.rmtree(work, ignore_errors=True)  # starting over, or round checkpoints of another query
        work.mkdir(parents=True, exist_ok=True)
        (work / "identity").write_text(key)

    def _extends(self, attrs: dict[str, Any], complete: bool = True) -> bool:
        """Whether the store with `attrs` is this query with a smaller budget (its rounds are a prefix of ours)."""
        found = (attrs.get("identity") or {}).get("extra") or {}
        want = json.loads(json.dumps(self.store_spec.identity()))["extra"]
        old_n = (found.get("budget") or {}).get("n")
        same = same_content(attrs, self.store_spec, ignore=("extra",)) and found.get("active") == want["active"]
        same = same and {**found.get("budget", {}), "n": None} == {**want["budget"], "n": None}
        grew = isinstance(old_n, int) and old_n < self.budget
        return bool(same and grew and attrs.get("complete", False) == complete)

    def _adopt(self, partial: Path) -> None:
        """Give the store at `partial` this run's identity (its budget), still incomplete: StoreWriter resumes it."""
        g = zarr.open_group(str(partial), mode="r+")
        ident = json.loads(json.dumps(self.store_spec.identity()))
        g.attrs.update({"identity": ident, **ident["extra"], "complete": False})

    def _work_key(self) -> str:
        """The round checkpoints' identity: the store's without the budget (round r never depends on it)."""
        ident = json.loads(json.dumps(self.store_spec.identity()))
        ident["extra"]["budget"]["n"] = None
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def calls_made(self) -> int:
        assert self.writer is not None
        return int(sum(self.writer.group[s]["queried"][:].sum() for s in self.store_spec.splits))

    def other_splits(self) -> None:
        """Validation and test splits: the teacher answers every image (unbudgeted, as `teach` does)."""
        assert self.writer is not None
        todo = [(s, j) for s in self.store_spec.splits if s != SPLIT for j in self.writer.pending(s)]
        if todo:
            set_threads(self.teach.threads)
            run_teach(
                self.manifest,
                self.model,
                self.out,
                self.store_spec,
                self.recipes,
                batch_size=self.teach.batch_size,
                device=self.device,
                shards=todo,
                finalize=False,
            )

    # -- the rounds -----------------------------------------------------------------------------

    def rounds(self, earlier: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        """Select and call, round by round (skipping what the store already holds); returns per-round timings."""
        w = self.writer
        assert w is not None
        g = w.group[SPLIT]
        shards = [read_shard(self.manifest, SPLIT, j) for j in range(self.store_spec.splits[SPLIT].num_shards)]
        # (N, H, W, C) uint8 (a list of N arrays when the images differ in size): every round scores every row
        self.images = np.concatenate(shards) if self.manifest.uniform else [im for sh in shards for im in sh]
        self.labels = self.manifest.iter_labels(SPLIT)
        log_rows: list[dict[str, Any]] = list(g.attrs.get("rounds") or [])
        timings = []
        for r, size in enumerate(self.sizes):
            t0 = time.perf_counter()
            recorded = r < len(log_rows) and log_rows[r]["calls"] == size
            if not recorded:
                log_rows = log_rows[:r] + [self._select(r, size)]
                w.group[SPLIT].attrs["rounds"] = log_rows  # after the selection arrays: the round is now recorded
            t1 = time.perf_counter()
            made = self._call(r)
            t2 = time.perf_counter()
            if recorded and not made and r in earlier:
                timings.append(earlier[r])  # nothing to do this time: keep the time the round took when it ran
                continue
            timings.append(
                {"round": r, "select_s": round(t1 - t0, 3), "teacher_s": round(t2 - t1, 3), "calls_now": made}
            )
            log.info(
                "%s round %d/%d: %d calls (%d made now), student steps %d, select %.1f s, teacher %.1f s",
                self.name,
                r,
                len(self.sizes) - 1,
                size,
                made,
                log_rows[r]["student_steps"],
                t1 - t0,
                t2 - t1,
            )
        return timings

    def _select(self, r: int, size: int) -> dict[str, Any]:
        """Choose round r's `size` sample-views and record them (round, order) before any teacher call."""
        w = self.writer
        assert w is not None
        round_, order = w.selection(SPLIT)
        queried = w.group[SPLIT]["queried"][:]
        if (queried & (round_ > r)).any():
            raise RuntimeError(f"{self.out}: calls of rounds after {r} exist while round {r} is being selected")
        round_ = np.where((round_ >= r) & ~queried, -1, round_)  # a selection of a killed run, never called
        entry: dict[str, Any] = {"round": r, "calls": size, "pool": 0, "student_steps": 0, "val_accuracy": None}
        if r == 0:
            ids = selection_order(self.labels, self.views, self.spec.seed_strategy, self.spec.seed)[:size]
            rows, views = ids // self.views, ids % self.views
        else:
            pool = queried & (round_ >= 0) & (round_ < r)  # (N, V): every call of the earlier rounds is made
            student, result = self._round_student(r, pool)
            entry.update(pool=int(pool.sum()), student_steps=result.schedule.steps, val_accuracy=result.val_acc)
            candidates = (round_ < 0) | (round_ == r)  # not chosen by an earlier round (round r's own: a resumed run)
            rows, views = self._rank(student, candidates, pool, size)
        prior = (round_ == r) & queried  # calls a smaller budget's last round made: they must come first again
        before = order.copy()
        round_[rows, views] = r
        order = np.where(round_ >= 0, order, -1)
        order[rows, views] = sum(self.sizes[:r]) + np.arange(len(rows))
        picked = np.zeros_like(prior)
        picked[rows, views] = True
        if (prior & ~picked).any() or not (order[prior] == before[prior]).all():
            raise RuntimeError(f"{self.out}: round {r} does not repeat the selection recorded for it")
        w.record_selection(SPLIT, round_, order)
        return entry

    def _round_student(self, r: int, pool: np.ndarray) -> tuple[nn.Module, Any]:
        """The distill student trained on the calls of rounds < r (resumed from its epoch checkpoint if killed)."""
        w = self.writer
        assert w is not None
        loss_fn = student_loss(self.distill, self.spec.loss)  # a fresh one: a loss may hold state (CKD's sampler)
        features = loss_fn.teacher_features if "teacher_features" in loss_fn.reads else None
        train_set = QueriedPool(
            self.manifest,
            SPLIT,
            w.read(SPLIT, self.manifest),
            pool,
            seed=self.spec.seed,
            epoch_samples=self.distill.pool_epoch_samples,
            teacher_features=features,
        )
        work = rounds_path(self.out) / f"round-{r}"
        set_threads(self.distill.train.threads)
        model, result = fit_student(
            self.manifest,
            self.distill,
            loss_fn,
            train_set,
            work,
            seed=self.spec.seed,
            device=self.device,
            resume="auto",  # a killed round continues from its epoch state (`train`'s fingerprint: only this round's)
            desc=f"{self.name} round {r}",
        )
        return model, result

    def _rank(self, student: nn.Module, candidates: np.ndarray, pool: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
        """The k best candidates (rows, views), best first, by `spec.score` of `student` on their augmented images."""
        set_threads(self.teach.threads)
        feats = self.spec.score in NEEDS_FEATURES
        rows, views = np.nonzero(candidates)  # (M,) each: the candidate positions, by row then view
        logits, features = self._student_outputs(student, rows, views, feats)
        pool_features = self._student_outputs(student, *np.nonzero(pool), feats)[1] if feats else None
        picks = select(
            self.spec.score,
            logits,
            k,
            features=features,
            pool_features=pool_features,
            shortlist=self.spec.candidates * self.spec.per_round,  # fixed: the last, shorter round is a prefix
        )
        return rows[picks], views[picks]

    @property
    def _partners(self) -> MixSource:
        """Where a mixing recipe's partner rows are: the split's decoded images, all in memory here."""
        s = self.store_spec.splits[SPLIT]
        return MixSource(lambda rows: take_images(self.images, rows), s.shard_rows, s.n)

    def _student_outputs(
        self, student: nn.Module, rows: np.ndarray, views: np.ndarray, feats: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Student logits (M, C) (and penultimate features (M, D)) of sample-views (rows, views), each on the image
        the teacher would see for it (`ViewRecipe.apply`, the function `shard_logits` calls)."""
        recipe: ViewRecipe = self.recipes[SPLIT]
        batch = self.teach.batch_size
        logits, features = [], []
        for a in range(0, len(rows), SCORE_CHUNK):
            r, v = rows[a : a + SCORE_CHUNK], views[a : a + SCORE_CHUNK]
            images = recipe.apply(take_images(self.images, r), r, v, self._partners)
            if feats:
                lg, ft = predict_features(student, images, batch, self.device)
                features.append(ft)
            else:
                lg = predict_arrays(student, images, batch, self.device)
            logits.append(lg)
        out = np.concatenate(logits) if logits else np.empty((0, self.manifest.num_classes), np.float32)
        return out, (np.concatenate(features) if features else None)

    def _call(self, r: int) -> int:
        """Ask the teacher about round r's selected sample-views it has not answered yet; returns how many."""
        w = self.writer
        assert w is not None
        g = w.group[SPLIT]
        s = self.store_spec.splits[SPLIT]
        owed = (w.selection(SPLIT)[0] == r) & ~g["queried"][:]  # (N, V)
        if not owed.any():
            return 0
        set_threads(self.teach.threads)
        if isinstance(self.model, nn.Module):
            self.model.eval().to(self.device, memory_format=torch.channels_last)
        for j in range(s.num_shards):
            start, stop = s.shard_range(j)
            need = owed[start:stop]
            if not need.any():
                continue
            batch = ShardBatch(SPLIT, j, start, self.images[start:stop], [sample_key(i) for i in range(start, stop)])
            logits = shard_logits(
                self.model,
                batch,
                self.recipes[SPLIT],
                need,
                s.num_classes,
                self.teach.batch_size,
                self.device,
                (s.shard_rows, s.n),
            )
            w.add_calls(SPLIT, j, need, logits)
        return int(owed.sum())

    def finish(self) -> Path:
        """Mark the train shards done, finalize (rename into place) and drop the round checkpoints."""
        w = self.writer
        assert w is not None
        w.mark_done(SPLIT)
        path = w.finalize()
        shutil.rmtree(rounds_path(self.out), ignore_errors=True)
        return path
