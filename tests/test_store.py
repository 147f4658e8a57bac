"""The logit store: round trip, verification, atomicity, resume after SIGKILL, top-k layout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache.budget import BudgetSpec
from pipeline.cache.store import LogitStore, StoreError, StoreWriter, partial_path, topk_compress, topk_expand
from pipeline.cache.teach import build_spec, run_teach
from pipeline.data.shards import write_dataset
from pipeline.data.views import PadCropFlip
from pipeline.lock import lock_path
from tests.conftest import assert_same_files, linear_teacher, synthetic_splits

RECIPES = {"train": PadCropFlip(2, 0, 2, True), "test": PadCropFlip(1, 0, 2, True)}
TEACHER = {"name": "t", "arch": "cnn_tiny", "weights_sha256": "abc"}


def spec_for(m, **kw):
    args = dict(dtype="float16", topk=0, compressor="blosc-zstd", chunk_rows=32, budget=BudgetSpec())
    args.update(kw)
    return build_spec(m, TEACHER, RECIPES, **args)


def test_round_trip_matches_direct_inference(tiny_manifest, tmp_path):
    m = tiny_manifest
    model = linear_teacher(m)
    run_teach(m, model, tmp_path / "t.zarr", spec_for(m, dtype="float32"), RECIPES, batch_size=50)
    store = LogitStore(tmp_path / "t.zarr", "train", m)
    assert (store.n, store.views, store.num_classes) == (256, 2, 4)
    logits = store.read_all()
    from pipeline.cache.teach import load_shard
    from pipeline.models import predict_arrays

    b = load_shard(m, "train", 1)
    imgs = RECIPES["train"].apply(b.images, np.arange(64, 128), np.ones(64, int))
    np.testing.assert_allclose(logits[64:128, 1], predict_arrays(model, imgs, 64, torch.device("cpu")), atol=1e-5)
    np.testing.assert_array_equal(store.read_rows(np.array([5, 200, 64, 5])), logits[[5, 200, 64, 5]])
    attrs = store.attrs
    assert attrs["teacher"] == TEACHER and attrs["dataset"]["manifest_sha256"] == m.sha256
    assert attrs["teacher_calls"] == {"train": 512, "test": 96}
    assert store.view_recipe == RECIPES["train"].to_dict()
    assert store.queried().all()


def test_store_is_few_files_and_float16_by_default(tiny_manifest, tmp_path):
    run_teach(tiny_manifest, linear_teacher(tiny_manifest), tmp_path / "t.zarr", spec_for(tiny_manifest), RECIPES)
    g = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")
    assert g["train"]["logits"].dtype == np.float16
    chunk_files = [p for p in (tmp_path / "t.zarr/train/logits/c").rglob("*") if p.is_file()]
    assert len(chunk_files) == 4  # one file per store shard (sharding), not one per 32-row chunk


def test_mismatched_data_set_is_rejected_naming_both(tiny_manifest, tmp_path):
    run_teach(tiny_manifest, linear_teacher(tiny_manifest), tmp_path / "t.zarr", spec_for(tiny_manifest), RECIPES)
    splits, classes = synthetic_splits(n_train=192)
    other = write_dataset(tmp_path / "other", "other", splits, classes, shard_size=64)
    with pytest.raises(StoreError) as e:
        LogitStore(tmp_path / "t.zarr", "train", other)
    msg = str(e.value)
    assert tiny_manifest.sha256[:12] in msg and other.sha256[:12] in msg and "N 256 != 192" in msg


def test_partial_and_non_stores_are_refused(tiny_manifest, tmp_path):
    m = tiny_manifest
    w = StoreWriter(tmp_path / "t.zarr", spec_for(m))
    with pytest.raises(StoreError, match="partial"):
        LogitStore(partial_path(tmp_path / "t.zarr"), "train")
    with pytest.raises(StoreError, match="partial run exists"):
        LogitStore(tmp_path / "t.zarr", "train")
    with pytest.raises(StoreError, match="not written"):
        w.finalize()
    (tmp_path / "junk.zarr").mkdir()
    (tmp_path / "junk.zarr" / "x.txt").write_text("hi")
    with pytest.raises(StoreError, match="not a Zarr group"):
        LogitStore(tmp_path / "junk.zarr", "train")


def test_existing_store_needs_force(tiny_manifest, tmp_path):
    m = tiny_manifest
    run_teach(m, linear_teacher(m), tmp_path / "t.zarr", spec_for(m), RECIPES)
    with pytest.raises(StoreError, match="--force"):
        run_teach(m, linear_teacher(m), tmp_path / "t.zarr", spec_for(m), RECIPES)
    run_teach(m, linear_teacher(m, seed=1), tmp_path / "t.zarr", spec_for(m), RECIPES, force=True)


def test_partial_store_of_another_run_is_not_resumed(tiny_manifest, tmp_path):
    m = tiny_manifest
    StoreWriter(tmp_path / "t.zarr", spec_for(m))
    other = dict(TEACHER, weights_sha256="different")
    with pytest.raises(StoreError, match="different run.*teacher"):
        StoreWriter(
            tmp_path / "t.zarr",
            build_spec(
                m, other, RECIPES, dtype="float16", topk=0, compressor="blosc-zstd", chunk_rows=32, budget=BudgetSpec()
            ),
        )


def test_nan_logits_are_rejected_with_keys(tiny_manifest, tmp_path):
    m = tiny_manifest

    def bad_teacher(imgs: np.ndarray) -> np.ndarray:
        out = np.zeros((len(imgs), 4), np.float32)
        out[3, 1] = np.nan
        return out

    with pytest.raises(StoreError, match=r"NaN/Inf.*'00000003'"):
        run_teach(m, bad_teacher, tmp_path / "t.zarr", spec_for(m), RECIPES)
    assert not (tmp_path / "t.zarr").exists()


def test_float16_overflow_is_an_error(tiny_manifest, tmp_path):
    m = tiny_manifest
    with pytest.raises(StoreError, match="float16"):
        run_teach(m, lambda imgs: np.full((len(imgs), 4), 1e6, np.float32), tmp_path / "t.zarr", spec_for(m), RECIPES)


def test_topk_expand_exact_at_t1():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (50, 2, 20)).astype(np.float32)
    vals, idx, tail = topk_compress(z, 5)
    dense = topk_expand(vals, idx, tail, 20)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(dense - dense.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    top = np.take_along_axis(p, idx, -1)
    np.testing.assert_allclose(np.take_along_axis(q, idx, -1), top, rtol=1e-4)  # top k exact
    rest = q.sum(-1) - np.take_along_axis(q, idx, -1).sum(-1)
    np.testing.assert_allclose(rest, tail, atol=1e-5)  # tail mass preserved
    np.testing.assert_array_equal(np.argsort(-dense, -1)[..., :1], idx[..., :1])


def test_topk_store_round_trip(tiny_manifest, tmp_path):
    m = tiny_manifest
    run_teach(m, linear_teacher(m), tmp_path / "d.zarr", spec_for(m, dtype="float32"), RECIPES)
    run_teach(m, linear_teacher(m), tmp_path / "k.zarr", spec_for(m, dtype="float32", topk=2), RECIPES)
    d = LogitStore(tmp_path / "d.zarr", "train", m).read_all()
    k = LogitStore(tmp_path / "k.zarr", "train", m).read_all()
    np.testing.assert_array_equal(d.argmax(-1), k.argmax(-1))
    g = zarr.open_group(str(tmp_path / "k.zarr"), mode="r")
    assert g["train"]["topk_indices"].dtype == np.uint8 and "logits" not in g["train"]


KILL_SCRIPT = r"""
import sys, time, numpy as np, torch
sys.path.insert(0, {root!r})
from pipeline.data.shards import load_manifest
from pipeline.cache.teach import build_spec, run_teach
from pipeline.data.views import PadCropFlip
from tests.conftest import linear_teacher
m = load_manifest({shards!r})
recipes = {{"train": PadCropFlip(2, 0, 2, True), "test": PadCropFlip(1, 0, 2, True)}}
spec = build_spec(m, {{"name": "t", "arch": "cnn_tiny", "weights_sha256": "abc"}}, recipes, dtype="float16", topk=0,
                  compressor="blosc-zstd", chunk_rows=32)
model = linear_teacher(m)
calls = []
class Slow(torch.nn.Module):
    def __init__(self, m):
        super().__init__(); self.m = m
    def forward(self, x):
        calls.append(len(x)); time.sleep({sleep}); return self.m(x)
run_teach(m, Slow(model), {out!r}, spec, recipes, batch_size=1000)
print("CALLS", sum(calls))
"""


def _script(tmp_path, shards, out, sleep):
    root = str(Path(__file__).resolve().parents[1])
    return KILL_SCRIPT.format(root=root, shards=str(shards), out=str(out), sleep=sleep)


def test_sigkill_mid_run_then_resume_equals_uninterrupted(fresh_manifest, tmp_path):
    m = fresh_manifest
    ref = tmp_path / "ref.zarr"
    out = tmp_path / "t.zarr"
    done_dir = partial_path(out) / "train" / "done" / "c"
    proc = subprocess.Popen([sys.executable, "-c", _script(tmp_path, m.root, out, 0.4)])
    deadline = time.time() + 60
    while time.time() < deadline and (not done_dir.exists() or len(list(done_dir.iterdir())) < 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and partial_path(out).exists()
    assert json.loads(lock_path(out).read_text())["pid"] == proc.pid  # the dead writer's lock is left behind
    finished = len(list(done_dir.iterdir()))
    assert 2 <= finished < 4
    res = subprocess.run([sys.executable, "-c", _script(tmp_path, m.root, out, 0.0)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"taking over the stale lock {lock_path(out)} of pid {proc.pid}" in res.stderr
    calls = int(res.stdout.split("CALLS")[1])
    # Only unfinished shards were recomputed: (4 - finished) train shards x 2 views + 2 test shards x 1 view.
    assert calls == (4 - finished) * 64 * 2 + 96
    res = subprocess.run([sys.executable, "-c", _script(tmp_path, m.root, ref, 0.0)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for split in ("train", "test"):
        a = LogitStore(out, split, m)
        b = LogitStore(ref, split, m)
        np.testing.assert_array_equal(a.read_all(), b.read_all())
        np.testing.assert_array_equal(a.queried(), b.queried())
    assert json.loads((out / "zarr.json").read_text())["attributes"]["complete"] is True
    assert_same_files(out, ref)  # byte for byte, no stray temp file of the killed write: DVC sees the same output
    assert not lock_path(out).exists()
