"""Ensemble teachers from stored logits (issue 15): combination rules, the ensemble store, bad input, training on it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.budget import BudgetSpec
from pipeline.cache.ensemble import COMBINES, combine_logits, ensemble_store
from pipeline.cache.store import LogitStore, StoreError, StoreWriter, partial_path
from pipeline.cache.teach import build_spec, run_teach
from pipeline.config import ConfigError, EnsembleSpec, ensembles_section
from pipeline.data.shards import write_dataset
from pipeline.data.views import PadCropFlip
from pipeline.losses import build_loss
from pipeline.records import read_record
from pipeline.training.dataset import DistillDataset
from pipeline.training.pool import QueriedPool
from pipeline.training.transport import make_loader
from tests.conftest import linear_teacher, synthetic_splits

RECIPES = {"train": PadCropFlip(2, 0, 2, True), "test": PadCropFlip(1, 0, 2, True)}


def teach(m, folder: Path, name: str, seed: int, recipes=RECIPES, budget: BudgetSpec | None = None, **kw) -> Path:
    """Cache a deterministic random cnn_tiny teacher (`seed`) as data/logits/<name>.zarr under `folder`."""
    spec = build_spec(
        m, {"name": name, "arch": "cnn_tiny", "weights_sha256": f"w{seed}"}, recipes, chunk_rows=32, budget=budget, **kw
    )
    out = folder / f"{name}.zarr"
    run_teach(m, linear_teacher(m, seed=seed), out, spec, recipes, batch_size=128)
    return out


@pytest.fixture(scope="module")
def cached(tiny_manifest, tmp_path_factory):
    """Three cached teachers a, b, c of the tiny data set (2 train views, 1 test view)."""
    folder = tmp_path_factory.mktemp("logits")
    for k, name in enumerate("abc"):
        teach(tiny_manifest, folder, name, seed=k)
    return tiny_manifest, folder


def store_of(folder: Path):
    return lambda name: folder / f"{name}.zarr"


# --------------------------------------------------------------------------------------------------
# combination rules: golden values from a naive float64 implementation


def naive_combine(zs: list[list[float]], w: list[float], rule: str) -> list[float]:
    total = sum(w)
    if rule == "mean_logits":
        return [sum(wm * z[c] for wm, z in zip(w, zs, strict=True)) / total for c in range(len(zs[0]))]
    probs = []
    for z in zs:
        m = max(z)
        e = [math.exp(v - m) for v in z]
        probs.append([v / sum(e) for v in e])
    return [math.log(sum(wm * p[c] for wm, p in zip(w, probs, strict=True)) / total) for c in range(len(zs[0]))]


@pytest.mark.parametrize("rule", COMBINES)
@pytest.mark.parametrize("weights", [[1.0, 1.0], [3.0, 1.0], [0.0, 2.0], [0.2, 0.5, 0.3]])
def test_combine_rules_golden(rule, weights):
    rng = np.random.default_rng(len(weights))
    z = (rng.normal(size=(5, 2, len(weights), 7)) * 4).astype(np.float32)  # (n, V, M, C)
    z[0, 0, :, :] += 60.0  # large logits: the log-sum-exp must stay finite
    w = np.asarray(weights) / sum(weights)
    got = combine_logits(z, w, rule)
    assert got.shape == (5, 2, 7) and got.dtype == np.float32
    for i in range(5):
        for v in range(2):
            ref = naive_combine(z[i, v].astype(np.float64).tolist(), weights, rule)
            np.testing.assert_allclose(got[i, v], ref, rtol=1e-5, atol=1e-4)
    if rule == "mean_probs":  # softmax of the combination is the weighted mean of the members' softmaxes
        p = torch.from_numpy(z).double().softmax(-1)
        mix = (p * torch.from_numpy(w)[None, None, :, None]).sum(2)
        assert torch.allclose(torch.from_numpy(got).double().softmax(-1), mix, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# the ensemble store


def test_ensemble_store_holds_the_combination_and_the_members(cached, tmp_path):
    m, folder = cached
    stores = lambda n: folder / f"{n}.zarr" if n in ("a", "b", "c") else tmp_path / f"{n}.zarr"  # noqa: E731
    path = ensemble_store(m, "ab", EnsembleSpec(("a", "b"), "mean_probs", (3.0, 1.0)), stores)
    assert path == tmp_path / "ab.zarr" and not partial_path(path).exists()
    for split in ("train", "test"):
        e, a, b = (LogitStore(p, split, m) for p in (path, folder / "a.zarr", folder / "b.zarr"))
        za, zb = a.read_all(), b.read_all()  # (N, V, C)
        want = combine_logits(np.stack([za, zb], 2), np.array([0.75, 0.25]), "mean_probs")
        np.testing.assert_allclose(e.read_all(), want, atol=2e-2, rtol=2e-3)  # float16 store, like its members
        assert e.member_names == ("a", "b") and (e.views, e.view_recipe) == (a.views, a.view_recipe)
        members = e.read_members(0, e.n)  # (N, V, M, C)
        np.testing.assert_array_equal(members[:, :, 0], za)  # members are copied exactly (same dtype)
        np.testing.assert_array_equal(members[:, :, 1], zb)
        np.testing.assert_array_equal(e.read_member_rows(np.array([70, 3, 70]))[:, :, 1], zb[[70, 3, 70]])
        assert e.queried().all()
    attrs = LogitStore(path, "train").attrs
    assert attrs["teacher"]["arch"] == "ensemble" and attrs["teacher"]["members"] == ["a", "b"]
    assert attrs["ensemble"]["weights"] == [0.75, 0.25] and attrs["dataset"]["manifest_sha256"] == m.sha256
    assert [x["teacher"]["weights_sha256"] for x in attrs["ensemble"]["members"]] == ["w0", "w1"]
    # size: the combination is one member's logits array, the members array M of them, in the members' dtype
    g, a = LogitStore(path, "train").group, LogitStore(folder / "a.zarr", "train").group
    assert g["logits"].dtype == a["logits"].dtype == np.float16 and g["logits"].shape == a["logits"].shape
    assert g["members"].shape == (256, 2, 2, 4) and g["members"].dtype == np.float16
    with pytest.raises(StoreError, match="--force"):  # a finished store is never silently rewritten
        ensemble_store(m, "ab", EnsembleSpec(("a", "b"), "mean_probs", (3.0, 1.0)), stores)


def test_ensemble_store_without_members_and_identity_changes_with_the_rule(cached, tmp_path):
    m, folder = cached
    stores = lambda n: folder / f"{n}.zarr" if n in ("a", "b", "c") else tmp_path / f"{n}.zarr"  # noqa: E731
    ensemble_store(m, "x", EnsembleSpec(("a", "b"), keep_members=False), stores)
    e = LogitStore(tmp_path / "x.zarr", "train", m)
    assert e.member_names == () and "members" not in e.group
    with pytest.raises(StoreError, match="no member logits"):
        e.read_members(0, 1)
    want = (LogitStore(folder / "a.zarr", "train").read_all() + LogitStore(folder / "b.zarr", "train").read_all()) / 2
    np.testing.assert_allclose(e.read_all(), want, atol=2e-2, rtol=2e-3)
    sha = e.teacher["weights_sha256"]
    ensemble_store(m, "x", EnsembleSpec(("a", "b"), "mean_probs", keep_members=False), stores, force=True)
    assert LogitStore(tmp_path / "x.zarr", "train").teacher["weights_sha256"] != sha


def test_nested_ensembles_equal_the_flat_three_way_mean(cached, tmp_path):
    """abc = ensemble(ab, c) with weights (2, 1): the flat mean of a, b, c, and its members are a, b, c."""
    m, folder = cached
    stores = lambda n: folder / f"{n}.zarr" if n in ("a", "b", "c") else tmp_path / f"{n}.zarr"  # noqa: E731
    ensemble_store(m, "ab", EnsembleSpec(("a", "b")), stores)
    ensemble_store(m, "abc", EnsembleSpec(("ab", "c"), weights=(2.0, 1.0)), stores)
    e = LogitStore(tmp_path / "abc.zarr", "train", m)
    flat = np.mean([LogitStore(folder / f"{n}.zarr", "train").read_all() for n in ("a", "b", "c")], axis=0)
    np.testing.assert_allclose(e.read_all(), flat, atol=3e-2, rtol=3e-3)
    assert e.member_names == ("a", "b", "c")
    leaves = e.attrs["ensemble"]["leaves"]
    assert [x["name"] for x in leaves] == ["a", "b", "c"]
    assert np.allclose([x["weight"] for x in leaves], [1 / 3] * 3)
    np.testing.assert_array_equal(e.read_members(0, e.n)[:, :, 2], LogitStore(folder / "c.zarr", "train").read_all())


def test_interrupted_ensemble_resumes_to_the_same_store(cached, tmp_path, monkeypatch):
    m, folder = cached
    stores = lambda n: folder / f"{n}.zarr" if n in ("a", "b", "c") else tmp_path / f"{n}.zarr"  # noqa: E731
    ensemble_store(m, "ref", EnsembleSpec(("a", "c")), stores)
    orig, calls = StoreWriter.write_shard, []

    def dies_after_two(self, *a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(a[:2])
        return orig(self, *a, **k)

    monkeypatch.setattr(StoreWriter, "write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        ensemble_store(m, "ens", EnsembleSpec(("a", "c")), stores)
    assert partial_path(tmp_path / "ens.zarr").exists() and not (tmp_path / "ens.zarr").exists()
    with pytest.raises(StoreError, match="partial run exists"):  # a half-written ensemble is never read
        LogitStore(tmp_path / "ens.zarr", "train")
    monkeypatch.setattr(StoreWriter, "write_shard", orig)
    written = []
    monkeypatch.setattr(StoreWriter, "write_shard", lambda self, *a, **k: written.append(a[:2]) or orig(self, *a, **k))
    ensemble_store(m, "ens", EnsembleSpec(("a", "c")), stores)
    assert len(written) == 4 + 2 - 2  # 4 train + 2 test shards, two already done
    for split in ("train", "test"):
        got, ref = LogitStore(tmp_path / "ens.zarr", split), LogitStore(tmp_path / "ref.zarr", split)
        np.testing.assert_array_equal(got.read_all(), ref.read_all())
        np.testing.assert_array_equal(got.read_members(0, got.n), ref.read_members(0, ref.n))


def test_building_an_ensemble_calls_no_teacher(cached, tmp_path, monkeypatch):
    """The ensemble is computed from stores only: no model forward (a counting nn.Module.__call__ stays at 0)."""
    m, folder = cached
    calls = []
    orig = torch.nn.Module.__call__
    monkeypatch.setattr(torch.nn.Module, "__call__", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    ensemble_store(
        m, "ab", EnsembleSpec(("a", "b")), lambda n: (folder if n in ("a", "b", "c") else tmp_path) / f"{n}.zarr"
    )
    assert calls == []
    teach(m, tmp_path, "d", seed=3)  # the counter works: caching a teacher does call it
    assert calls


# --------------------------------------------------------------------------------------------------
# bad input


def _params(ensembles, teachers=("a", "b", "c")):
    return {"teachers": {t: {"arch": "cnn_tiny"} for t in teachers}, "ensembles": ensembles}


@pytest.mark.parametrize(
    ("ensembles", "match"),
    [
        ({"e": {"members": ["a"]}}, r"ensembles\.e: an ensemble of 1 member.*name two members"),
        ({"e": {"members": "a"}}, r"ensembles\.e\.members: expected a list, got 'a'"),
        ({"e": {"members": ["a", "b", "c"]}}, r"3 members.*iterative/dvc#8171.*Nest.*members: \[a_b, c\]"),
        ({"e": {"members": ["a", "e"]}}, r"ensembles\.e: the ensemble names itself"),
        ({"e": {"members": ["a", "f"]}, "f": {"members": ["b", "e"]}}, r"cycle"),
        ({"e": {"members": ["a", "zz"]}}, r"member\(s\) \['zz'\] are neither teachers nor ensembles"),
        ({"a": {"members": ["b", "c"]}}, r"'a' is also a teacher"),
        ({"e": {"members": ["a", "a"]}}, r"repeat a teacher"),
        ({"e": {"members": ["a", "b"], "weights": [1.0]}}, r"1 weight\(s\) \[1.0\] for 2 members"),
        (
            {"e": {"members": ["a", "b"], "weights": [1.0, -1.0]}},
            r"ensembles\.e\.weights\[1\]: expected a non-negative number",
        ),
        ({"e": {"members": ["a", "b"], "weights": [0, 0]}}, r"sum to 0(\.0)?; they must sum to a positive number"),
        ({"e": {"members": ["a", "b"], "keep_members": "yes"}}, r"ensembles\.e\.keep_members: expected true or false"),
        ({"e": {"members": ["a", "b"], "combin": "x"}}, r"unknown key\(s\) \['combin'\]"),
        ({"e": {"weights": [1, 1]}}, r"ensembles\.e:.*members"),
    ],
)
def test_bad_ensemble_config_is_a_clear_error(ensembles, match):
    with pytest.raises(ConfigError, match=match):
        ensembles_section(_params(ensembles))


def test_good_ensemble_config_and_nesting():
    got = ensembles_section(
        _params({"ab": {"members": ["a", "b"]}, "abc": {"members": ["ab", "c"], "weights": [2, 1]}})
    )
    assert got["ab"] == EnsembleSpec(("a", "b")) and tuple(got["abc"].weights) == (2, 1)
    assert ensembles_section({"teachers": {"a": {}}}) == {}  # the section is optional


def test_member_not_cached_is_named_with_the_fix(cached, tmp_path):
    m, folder = cached
    with pytest.raises(StoreError, match=r"member 'zz' of ensemble 'e': no logit store at .*zz\.zarr.*teach"):
        ensemble_store(
            m, "e", EnsembleSpec(("a", "zz")), lambda n: (folder if n in ("a", "b", "c") else tmp_path) / f"{n}.zarr"
        )
    with pytest.raises(StoreError, match="unknown rule 'median'.*mean_logits"):
        ensemble_store(
            m,
            "e",
            EnsembleSpec(("a", "b"), "median"),
            lambda n: (folder if n in ("a", "b", "c") else tmp_path) / f"{n}.zarr",
        )
    assert not partial_path(tmp_path / "e.zarr").exists()  # nothing half-written


def test_member_cached_on_other_data_or_views_or_budget_is_refused(cached, tmp_path):
    m, folder = cached
    splits, classes = synthetic_splits(n_train=192)
    other = write_dataset(tmp_path / "other", "other", splits, classes, shard_size=64)
    teach(other, tmp_path, "o", seed=0)
    where = lambda n: (folder if n in ("a", "b", "c") else tmp_path) / f"{n}.zarr"  # noqa: E731
    with pytest.raises(StoreError, match=r"member 'o' of ensemble 'e'.*does not match shards.*manifest sha256"):
        ensemble_store(m, "e", EnsembleSpec(("a", "o")), where)
    one_view = {"train": PadCropFlip(1, 0, 2, True), "test": RECIPES["test"]}
    teach(m, tmp_path, "v1", seed=5, recipes=one_view)
    with pytest.raises(StoreError, match=r"members 'a' and 'v1' cached different views: 2 view\(s\).*1 view\(s\)"):
        ensemble_store(m, "e", EnsembleSpec(("a", "v1")), where)
    teach(m, tmp_path, "q1", seed=6, budget=BudgetSpec(100, "random", 0))
    teach(m, tmp_path, "q2", seed=7, budget=BudgetSpec(100, "random", 1))
    with pytest.raises(StoreError, match=r"'q1' and 'q2' answered different sample-views.*budget"):
        ensemble_store(m, "e", EnsembleSpec(("q1", "q2")), where)
    with pytest.raises(StoreError, match=r"'a' and 'q1' answered different sample-views \(512 vs 100"):
        ensemble_store(m, "e", EnsembleSpec(("a", "q1")), where)
    teach(m, tmp_path, "q3", seed=8, budget=BudgetSpec(100, "random", 0))  # same budget: fine
    e = LogitStore(ensemble_store(m, "qq", EnsembleSpec(("q1", "q3")), where), "train", m)
    assert int(e.queried().sum()) == 100 and np.isnan(e.read_all()[~e.queried()]).all()


# --------------------------------------------------------------------------------------------------
# training on an ensemble store


def test_loader_and_pool_batches_carry_the_member_logits(cached, tmp_path):
    m, folder = cached
    path = ensemble_store(
        m, "ab", EnsembleSpec(("a", "b")), lambda n: (folder if n in ("a", "b", "c") else tmp_path) / f"{n}.zarr"
    )
    members = LogitStore(path, "train").read_members(0, 256)  # (N, V, M, C)
    ds = DistillDataset(m, "train", path, seed=0, shuffle_buffer=32, members=True)
    seen = 0
    for workers in (0, 1):
        for batch in make_loader(ds, 32, workers):
            want = members[batch["index"].numpy(), batch["view"].numpy()]  # (B, M, C)
            np.testing.assert_array_equal(batch["members"].numpy(), want)
            seen += len(batch["label"])
    assert seen == 2 * 256
    assert "members" not in next(iter(make_loader(DistillDataset(m, "train", path), 32, 0)))  # only when asked
    allowed = np.zeros((256, 2), dtype=bool)
    allowed[::3, 1] = True
    pool = QueriedPool(m, "train", path, allowed, members=True)
    batch = next(pool.numpy_batches(16))
    np.testing.assert_array_equal(batch["members"], members[batch["index"], batch["view"]])
    with pytest.raises(ValueError, match="holds no member logits"):
        DistillDataset(m, "train", folder / "a.zarr", members=True)


def test_distill_on_ensembles_end_to_end(tmp_path, monkeypatch):
    """The stages on a tiny project: teach two teachers, build the ensemble (stage), distill kd + mtkd from it,
    evaluate; the per-member loss gets the members; misuse is a clear error."""
    from pipeline.models import save_model
    from stages import distill, ensemble, evaluate, prepare
    from stages import teach as teach_stage
    from tests.conftest import make_project, tiny_params

    params = tiny_params(
        teachers={"small": {"arch": "cnn_tiny"}, "other": {"arch": "cnn_tiny"}},
        ensembles={
            "both": {"members": ["small", "other"]},
            "flat": {"members": ["small", "other"], "keep_members": False},
        },
    )
    make_project(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    from pipeline.data.shards import load_manifest

    m = load_manifest("data/shards/tiny")
    for k, name in enumerate(("small", "other")):
        save_model(f"data/teachers/{name}.safetensors", linear_teacher(m, seed=k), "cnn_tiny")
        teach_stage.main(["--name", name])
    ensemble.main(["--name", "both"])
    ensemble.main(["--name", "flat"])
    assert LogitStore("data/logits/both.zarr", "train", m).member_names == ("small", "other")
    import pipeline.training.loop as loop

    got: list = []
    orig = loop.compute_loss
    monkeypatch.setattr(loop, "compute_loss", lambda *a, **k: got.append(k.get("members")) or orig(*a, **k))
    distill.main(["--teacher", "both", "--loss", "mtkd"])
    assert got and all(x is not None and x.shape[1:] == (2, 4) for x in got)
    got.clear()
    distill.main(["--teacher", "both", "--loss", "kd"])  # a loss on the combined logits never loads the members
    assert got and all(x is None for x in got)
    evaluate.main(["--student", "both-mtkd-full-0"])
    record = read_record("metrics/details/both-mtkd-full-0.json", "student")
    ens_test = LogitStore("data/logits/both.zarr", "test").read_all()[:, 0]
    assert record["student"]["teacher"] == "both" and record["student"]["store"] == "data/logits/both.zarr"
    # agreement is computed against the ensemble store's test logits
    assert 0 <= record["agreement"] <= 1 and ens_test.shape == (m.split("test").n, 4)
    with pytest.raises(ConfigError, match=r"ensemble 'flat' was built without its member logits.*keep_members: true"):
        distill.main(["--teacher", "flat", "--loss", "mtkd"])
    with pytest.raises(ConfigError, match="unknown ensemble 'nope'"):
        ensemble.main(["--name", "nope"])
    p = tiny_params(**{k: v for k, v in params.items() if k in ("teachers", "ensembles")})
    p["distill"]["teacher_source"] = "online"
    (tmp_path / "params.yaml").write_text(__import__("yaml").safe_dump(p))
    with pytest.raises(ConfigError, match="no model to run online"):
        distill.main(["--teacher", "both", "--loss", "kd"])
    # mtkd on a single teacher's store: the teacher is the one member (kd)
    (tmp_path / "params.yaml").write_text(__import__("yaml").safe_dump(params))
    distill.main(["--teacher", "small", "--loss", "mtkd"])
    assert Path("data/students/small-mtkd-full-0/model.safetensors").exists()


def test_mtkd_trains_like_kd_on_a_single_teacher(cached, tmp_path):
    """mtkd without members (M = 1) trains bit for bit like kd: the fallback really is kd."""
    from pipeline.config import OptimConfig, TrainConfig
    from pipeline.models import build_for
    from pipeline.training.loop import train

    m, folder = cached
    cfg = TrainConfig(epochs=1, batch_size=32, workers=0, shuffle_buffer=40, threads=1, optim=OptimConfig(lr=0.05))
    states = []
    for loss in ("kd", "mtkd"):
        torch.manual_seed(0)
        model = build_for("cnn_tiny", m)
        train(model, build_loss(loss), DistillDataset(m, "train", folder / "a.zarr", seed=0), cfg, tmp_path / loss)
        states.append(model.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-5, atol=1e-6)


def test_ensemble_results_driver_end_to_end_on_a_tiny_project(tmp_path, monkeypatch):
    """benchmarks/ensemble_results.py on a tiny project: builds the ensemble store in its work folder (the project's
    data is never written), trains every row once, writes the tables with intervals, and resumes without retraining."""
    import benchmarks.ensemble_results as er
    import benchmarks.students as students
    from pipeline.models import save_model
    from stages import prepare
    from stages import teach as teach_stage
    from tests.conftest import make_project, tiny_params

    teachers = {"small": {"arch": "cnn_tiny"}, "other": {"arch": "cnn_tiny"}}
    make_project(tmp_path, tiny_params(teachers=teachers, distill={"teachers": ["small", "other"]}))
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    from pipeline.data.shards import load_manifest

    m = load_manifest("data/shards/tiny")
    for k, name in enumerate(teachers):
        save_model(f"data/teachers/{name}.safetensors", linear_teacher(m, seed=k), "cnn_tiny")
        teach_stage.main(["--name", name])
    trained: list[str] = []
    orig = students.train_student
    monkeypatch.setattr(students, "train_student", lambda *a, **k: trained.append(a[2].loss) or orig(*a, **k))
    argv = ["--seeds", "0", "1", "--losses", "kd", "mtkd:confidence", "--kl-losses", "kd", "--out", "work"]
    er.main(argv)
    assert not Path("data/logits/small+other.zarr").exists() and Path("work/logits/small+other.zarr").exists()
    # per seed: ce; kd from small, other, the ensemble; mtkd:confidence; kd + standardization on the three
    assert len(trained) == 2 * 8 and trained.count("mtkd") == 2
    std = read_record("work/metrics/details/small+other-kd+std-s0.json", "student")["student"]
    assert std["teacher"] == "small+other" and std["loss"] == "kd"
    md = Path("work/results.md").read_text()
    assert "| kd from small+other (ensemble) |" in md and "| small+other: mtkd:confidence |" in md
    assert "| other: kd + standardization |" in md and "ensemble small+other vs its best member" in md
    assert "best-validation epoch" in md  # the students keep their best validation epoch
    res = json.loads(Path("work/results.json").read_text())
    assert all(
        len(v) == 2 and all(0 <= a <= 100 for a in v) for part in ("teachers", "ensemble") for v in res[part].values()
    )
    trained.clear()
    er.main(argv)  # resumable: every student is found, none retrained
    assert trained == [] and Path("work/results.md").read_text() == md
    # the per-teacher table: ce and kd are reused, dist is trained from each member; "other" is the stronger
    Path("metrics/teachers").mkdir(parents=True, exist_ok=True)
    for name, val in (("small", 0.4), ("other", 0.6)):
        Path(f"metrics/teachers/{name}.json").write_text(json.dumps({"accuracy": val, "val_accuracy": val}))
    er.main([*argv, "--member-losses", "ce", "kd", "dist"])
    assert trained == ["dist"] * 4
    md = Path("work/results.md").read_text()
    assert (
        "### Each single teacher with each loss" in md
        and "| small: dist |" in md
        and "| other: ce (no teacher) |" in md
    )
    assert "- small: dist vs kd:" in md and "- dist: from other vs from small:" in md
    res = json.loads(Path("work/results.json").read_text())
    assert res["members"]["other: ce (no teacher)"] == res["teachers"]["ce (no teacher)"]
    mean, half = er.interval([70.0, 72.0, 74.0])
    assert mean == 72.0 and half == pytest.approx(4.302653 * 2.0 / math.sqrt(3), rel=1e-5)  # t_{0.975, 2}
    v = er.standardized(er.variant("dkd"), "paper", {"dkd": {"alpha": 1.0, "beta": 8.0, "T": 4.0, "warmup": 1}})
    assert dict(v.overrides) == {"standardize": True, "T": 2.0, "alpha": 9.0, "beta": 72.0}
