"""`kdcache inspect` (dask, out of core) and `kdcache import-logits` (logits from elsewhere)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cache.budget import BudgetSpec
from pipeline.cache.import_logits import import_logits
from pipeline.cache.inspect_store import inspect_store
from pipeline.cache.store import LogitStore, StoreError
from pipeline.cache.teach import build_spec, run_teach
from pipeline.cli import main as cli
from pipeline.data.views import PadCropFlip
from pipeline.evaluation.metrics import expected_calibration_error, softmax
from tests.conftest import linear_teacher

RECIPES = {"train": PadCropFlip(2, 0, 2, True), "test": PadCropFlip(1, 0, 2, True)}


@pytest.fixture(scope="module")
def store(tiny_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "t.zarr"
    spec = build_spec(
        tiny_manifest,
        {"name": "t", "arch": "cnn_tiny", "weights_sha256": "abc"},
        RECIPES,
        dtype="float32",
        topk=0,
        compressor="blosc-zstd",
        chunk_rows=32,
        budget=BudgetSpec(),
    )
    run_teach(tiny_manifest, linear_teacher(tiny_manifest), out, spec, RECIPES)
    return out


def test_inspect_matches_numpy_with_tiny_chunks(store, tiny_manifest):
    labels = tiny_manifest.iter_labels("train")
    info = inspect_store(store, "train", labels=labels, chunk_rows=16)  # 16 blocks for 256 rows: out of core
    z = LogitStore(store, "train").read_all()[:, 0]
    p = softmax(z.astype(np.float64))
    ent = -(p * np.log(p)).sum(1)
    assert info["teacher_calls"] == 512 and info["shards_done"] == "4/4" and info["complete"]
    assert info["teacher_top1"] == pytest.approx(float((z.argmax(1) == labels).mean()))
    assert info["entropy_mean"] == pytest.approx(float(ent.mean()), rel=1e-5)
    assert sum(info["entropy_hist"]["counts"]) == 256
    assert info["ece"] == pytest.approx(expected_calibration_error(z, labels), abs=1e-6)
    assert info["bytes_per_sample_view"] > 0 and info["layout"] == "dense"
    assert info["dataset"]["manifest_sha256"] == tiny_manifest.sha256


def test_inspect_a_topk_store_expands_it_as_the_loader_does(tiny_manifest, tmp_path):
    """A top-k store (teach.topk) is inspected through `topk_expand`, block by block: the same statistics as the
    expanded logits the store's reader returns (a (n, V, 1) tail block once broke it on every top-k store)."""
    out = tmp_path / "k.zarr"
    spec = build_spec(
        tiny_manifest, {"name": "t", "arch": "cnn_tiny", "weights_sha256": "abc"}, RECIPES, dtype="float16",
        topk=2, compressor="blosc-zstd", chunk_rows=32, budget=BudgetSpec(),
    )  # fmt: skip
    run_teach(tiny_manifest, linear_teacher(tiny_manifest), out, spec, RECIPES)
    labels = tiny_manifest.iter_labels("train")
    info = inspect_store(out, "train", labels=labels, chunk_rows=16)
    z = LogitStore(out, "train").read_all()[:, 0]  # (N, C) expanded view-0 logits
    p = softmax(z.astype(np.float64))
    assert info["layout"] != "dense" and info["teacher_calls"] == 512
    assert info["teacher_top1"] == pytest.approx(float((z.argmax(1) == labels).mean()))
    assert info["entropy_mean"] == pytest.approx(float(-(p * np.log(p)).sum(1).mean()), rel=1e-4)


def test_inspect_cli_prints_json(store, tiny_manifest, capsys):
    assert cli(["inspect", str(store), "--shards", str(tiny_manifest.root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shape"] == {"N": 256, "V": 2, "C": 4} and "teacher_top1" in out


def test_cli_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        cli(["--help"])
    text = capsys.readouterr().out
    for cmd in ("inspect", "compare", "import-logits", "teach", "distill"):
        assert cmd in text


def accurate(m, split: str, seed: int = 0) -> np.ndarray:
    """(N, C) logits of a teacher that is right ~90% of the time (label logit +3 over N(0, 1) noise)."""
    labels = m.iter_labels(split)
    z = np.random.default_rng(seed).normal(size=(len(labels), m.num_classes)).astype(np.float32)
    z[np.arange(len(labels)), labels] += 3.0
    return z


def test_import_npy_npz_parquet_round_trip(tiny_manifest, tmp_path):
    m = tiny_manifest
    rng = np.random.default_rng(0)
    train = accurate(m, "train")
    test = accurate(m, "test", seed=1)
    train[7] = np.nan  # a sample the (budget-limited) API teacher never answered
    np.save(tmp_path / "train.npy", train)
    perm = rng.permutation(96)
    np.savez(tmp_path / "test.npz", logits=test[perm], keys=np.array([f"{i:08d}" for i in perm]))
    out = import_logits(
        {"train": tmp_path / "train.npy", "test": tmp_path / "test.npz"}, m, tmp_path / "a.zarr", "api", dtype="float32"
    )
    s = LogitStore(out, "train", m)
    np.testing.assert_array_equal(s.read_all()[:, 0][~np.isnan(train[:, 0])], train[~np.isnan(train[:, 0])])
    assert not s.queried()[7, 0] and s.teacher_calls == 255
    np.testing.assert_array_equal(LogitStore(out, "test", m).read_all()[:, 0], test)  # keys re-ordered rows
    keys = [f"{i:08d}" for i in range(256)]
    pq.write_table(
        pa.table({"key": keys, "logits": [r.tolist() for r in np.nan_to_num(train)]}), tmp_path / "t.parquet"
    )
    out2 = import_logits({"train": tmp_path / "t.parquet"}, m, tmp_path / "b.zarr", "api2", without_test=True)
    assert LogitStore(out2, "train", m).n == 256


def test_import_checks_the_teacher_like_an_imported_checkpoint(tiny_manifest, tmp_path):
    """Reversed class order: refused naming the causes and the permutation that fits; accepted when asked.
    Train without test: refused unless asked."""
    m = tiny_manifest
    np.save(tmp_path / "train.npy", accurate(m, "train")[:, ::-1])  # the class order reversed
    np.save(tmp_path / "test.npy", accurate(m, "test", seed=1)[:, ::-1])
    files = {"train": tmp_path / "train.npy", "test": tmp_path / "test.npy"}
    with pytest.raises(StoreError) as err:
        import_logits(files, m, tmp_path / "r.zarr", "rev")
    msg = str(err.value)
    assert "near chance (25.0% for 4 classes)" in msg and "another class order" in msg and "train.npy" in msg
    assert "relabelling the teacher's classes as [3, 2, 1, 0]" in msg and "--accept-low-accuracy" in msg
    assert not (tmp_path / "r.zarr").exists()
    import_logits(files, m, tmp_path / "r.zarr", "rev", accept_low_accuracy=True)
    assert LogitStore(tmp_path / "r.zarr", "test", m).n == 96
    with pytest.raises(StoreError, match="no logits for the test split.*--without-test"):
        import_logits({"train": files["train"]}, m, tmp_path / "t.zarr", "t", accept_low_accuracy=True)


def test_a_truncated_parquet_file_is_one_clear_error(tiny_manifest, tmp_path):
    keys = [f"{i:08d}" for i in range(256)]
    pq.write_table(pa.table({"key": keys, "logits": accurate(tiny_manifest, "train").tolist()}), tmp_path / "t.parquet")
    raw = (tmp_path / "t.parquet").read_bytes()
    (tmp_path / "t.parquet").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(StoreError, match=r"t.parquet: not a readable Parquet file"):
        import_logits({"train": tmp_path / "t.parquet"}, tiny_manifest, tmp_path / "p.zarr", "p", without_test=True)


def test_import_rejects_bad_input_clearly(tiny_manifest, tmp_path):
    m = tiny_manifest
    np.save(tmp_path / "short.npy", np.zeros((255, 4), np.float32))
    with pytest.raises(StoreError, match="255 rows.*N=256"):
        import_logits({"train": tmp_path / "short.npy"}, m, tmp_path / "x.zarr", "x", without_test=True)
    np.save(tmp_path / "wide.npy", np.zeros((256, 5), np.float32))
    with pytest.raises(StoreError, match=r"shape \(256, 1, 5\)|expected"):
        import_logits({"train": tmp_path / "wide.npy"}, m, tmp_path / "x.zarr", "x", without_test=True)
    np.save(tmp_path / "ints.npy", np.zeros((256, 4), np.int64))
    with pytest.raises(StoreError, match="not floating point"):
        import_logits({"train": tmp_path / "ints.npy"}, m, tmp_path / "x.zarr", "x", without_test=True)
    bad = np.zeros((256, 4), np.float32)
    bad[3, 2] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    with pytest.raises(StoreError, match="00000003"):
        import_logits({"train": tmp_path / "inf.npy"}, m, tmp_path / "x.zarr", "x", without_test=True)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(StoreError, match="unsupported"):
        import_logits({"train": tmp_path / "x.csv"}, m, tmp_path / "x.zarr", "x", without_test=True)
    np.save(tmp_path / "ok.npy", accurate(m, "train"))
    import_logits({"train": tmp_path / "ok.npy"}, m, tmp_path / "y.zarr", "y", without_test=True)
    with pytest.raises(StoreError, match="--force"):
        import_logits({"train": tmp_path / "ok.npy"}, m, tmp_path / "y.zarr", "y", without_test=True)
