"""Sound comparisons: schedules that fit the data, the stratified validation split, best-on-validation
checkpoints, the teacher check, and the config errors that guard them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, DistillConfig, PrepareConfig, TeacherSpec, TrainConfig, from_dict
from pipeline.data.prepare import stratified_split, validation_counts
from pipeline.data.shards import iter_shard, load_manifest
from pipeline.models.sanity import near_chance
from pipeline.training.schedule import resolve_schedule
from pipeline.training.teacher import TeacherCheckError, teacher_check
from tests.conftest import make_project, tiny_params

# ---------------------------------------------------------------------------------------------- schedules


def test_schedule_rule():
    # steps: exactly that many
    s = resolve_schedule(TrainConfig(steps=25), steps_per_epoch=10, samples_per_epoch=320)
    assert (s.steps, s.epochs, s.samples) == (25, 2.5, 800) and s.rule == "steps=25"
    # epochs on a big data set: the floor does not bind
    s = resolve_schedule(TrainConfig(epochs=3, min_steps=1000), steps_per_epoch=422, samples_per_epoch=54000)
    assert (s.steps, s.epochs) == (1266, 3.0) and s.rule == "epochs=3"
    # a small data set: epochs raised to reach min_steps (whole epochs)
    s = resolve_schedule(TrainConfig(epochs=3, min_steps=1000), steps_per_epoch=28, samples_per_epoch=3600)
    assert s.steps == 28 * 36 >= 1000 and s.epochs == 36 and "raised to 36" in s.rule
    # neither: 3 epochs
    assert resolve_schedule(TrainConfig(), 7, 100).steps == 21
    d = s.to_dict()
    assert set(d) == {"steps", "epochs", "samples", "steps_per_epoch", "batch_size", "rule"}


@pytest.mark.parametrize(
    ("train", "match"),
    [
        ({"epochs": 3, "steps": 100}, r"distill\.train: give `epochs` or `steps`, not both"),
        ({"steps": 0}, r"distill\.train\.steps: expected null or a positive integer, got 0"),
        ({"epochs": -1}, r"distill\.train\.epochs: expected null or a positive integer"),
        ({"min_steps": -5}, r"distill\.train\.min_steps"),
        ({"select": "best"}, r"distill\.train\.select: expected one of \['best_val', 'last'\]"),
    ],
)
def test_bad_lengths_are_config_errors_naming_the_key(train, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(DistillConfig, {"train": train}, "distill")


def test_teacher_spec_length_and_seed_duplicates():
    with pytest.raises(ConfigError, match=r"teachers\.cnn: give `epochs` or `steps`, not both"):
        from_dict(TeacherSpec, {"arch": "cnn_small", "epochs": 2, "steps": 10}, "teachers.cnn")
    spec = from_dict(TeacherSpec, {"arch": "cnn_small", "steps": 500}, "teachers.cnn")
    merged = spec.train_config(TrainConfig(epochs=None, min_steps=1500))
    assert merged.steps == 500 and merged.epochs is None and merged.min_steps == 1500
    with pytest.raises(ConfigError, match=r"distill\.seeds: \['1'\] listed twice"):
        from_dict(DistillConfig, {"seeds": [0, 1, 1]}, "distill")


def test_the_loop_runs_exactly_the_step_budget(tiny_manifest, tmp_path):
    """steps: 13 with 8 steps per epoch (232 train images? no: 256 at batch 32): one full epoch, then 5 steps."""
    from pipeline.losses import build_loss
    from pipeline.models import build_for
    from pipeline.training.dataset import DistillDataset
    from pipeline.training.loop import train

    torch.manual_seed(0)
    model = build_for("cnn_tiny", tiny_manifest)
    cfg = TrainConfig(steps=13, batch_size=32, workers=0, shuffle_buffer=40, threads=1, eval_every=1)
    seen = []
    result = train(
        model,
        build_loss("ce"),
        DistillDataset(tiny_manifest, "train", seed=0, shuffle_buffer=40),
        cfg,
        tmp_path / "run",
        val_set=DistillDataset(tiny_manifest, "test", shuffle=False),
        on_batch=lambda e, b: seen.append(e),
    )
    spe = result.schedule.steps_per_epoch
    assert spe == 8 and len(seen) == 13 and seen.count(0) == spe and seen.count(1) == 13 - spe
    assert [r["steps"] for r in result.history] == [spe, 13 - spe]
    assert result.schedule.steps == 13 and result.schedule.epochs == pytest.approx(13 / 8)
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine reaches 0 at the step budget


# ---------------------------------------------------------------------------------------------- validation split

labels_st = st.lists(st.integers(0, 3), min_size=40, max_size=200).filter(
    lambda xs: all(xs.count(c) >= 10 for c in range(4))
)


@settings(max_examples=40, deadline=None)
@given(labels=labels_st, frac=st.sampled_from([0.1, 0.2, 0.35]), seed=st.integers(0, 5))
def test_stratified_split_is_seeded_disjoint_and_per_class(labels, frac, seed):
    y = np.array(labels)
    classes = ["a", "b", "c", "d"]
    tr, va = stratified_split(y, frac, seed, classes)
    assert np.intersect1d(tr, va).size == 0 and np.union1d(tr, va).size == len(y)
    for c in range(4):
        n_c = int((y == c).sum())
        assert int((y[va] == c).sum()) == int(np.floor(frac * n_c + 0.5)) >= 1
        assert int((y[tr] == c).sum()) >= 1
    tr2, va2 = stratified_split(y, frac, seed, classes)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)


def test_validation_count_spreads_in_proportion():
    y = np.repeat([0, 1, 2], [600, 300, 100])
    k = validation_counts(y, 100, ["a", "b", "c"])
    assert k.tolist() == [60, 30, 10]
    k = validation_counts(y, 7, ["a", "b", "c"])
    assert k.sum() == 7 and k.min() >= 1


@pytest.mark.parametrize(
    ("val", "match"),
    [
        (1000, r"prepare\.val=1000 is not smaller than the train split \(1000 images\)"),
        (0.001, r"leaves class 'b' \(300 train images\) without validation images: raise prepare\.val"),
        (3, r"leaves class 'c'.*without validation images"),
    ],
)
def test_bad_validation_sizes_name_the_key_and_the_fix(val, match):
    y = np.repeat([0, 1, 2], [600, 300, 100])
    with pytest.raises(ConfigError, match=match):
        validation_counts(y, val, ["a", "b", "c"])


@pytest.mark.parametrize(
    ("val", "match"),
    [
        (1.0, r"prepare\.val: expected null or a number in \[0, 1\) or a non-negative integer, got 1\.0"),
        (-2, r"prepare\.val: expected null or a number in \[0, 1\)"),
    ],
)
def test_prepare_val_values(val, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(PrepareConfig, {"val": val}, "prepare")


def test_prepare_writes_a_stratified_validation_split_of_train(tmp_path, monkeypatch):
    """The manifest records the val split; train + val are the source's train split, disjoint, per class."""
    from pipeline.data.sources import load_split
    from stages import prepare

    make_project(tmp_path, tiny_params(prepare={"val": 0.25, "val_seed": 3}))
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    m = load_manifest("data/shards/tiny")
    assert set(m.splits) == {"train", "val", "test"}
    src = load_split("synthetic", None, "train", **tiny_params()["prepare"]["options"])
    counts = np.bincount(src.labels)
    assert m.split("val").label_counts == tuple(int(np.floor(0.25 * c + 0.5)) for c in counts)
    assert m.split("train").n + m.split("val").n == len(src.labels)

    def images(split):
        return {img.tobytes() for s in m.split(split).shards for _, img, _ in iter_shard(m.root / s.path)}

    assert not images("train") & images("val")
    assert images("train") | images("val") == {img.tobytes() for img in src.images}


def test_a_class_without_validation_images_stops_prepare(tmp_path, monkeypatch):
    from stages import prepare

    params = tiny_params(prepare={"val": 2})  # 2 images for 4 classes
    make_project(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"prepare\.val=2 leaves class .* without validation images"):
        prepare.main([])
    assert not Path("data/shards/tiny").exists()


# ---------------------------------------------------------------------------------------------- selection


def test_the_epoch_best_on_validation_is_kept(tiny_manifest, tmp_path, monkeypatch):
    """Validation scores 0.5, 0.9, 0.7 -> the returned model holds epoch 2's weights (also after a resume)."""
    import pipeline.training.loop as loop
    from pipeline.losses import build_loss
    from pipeline.models import build_for
    from pipeline.training.dataset import DistillDataset

    scores: list[float] = []
    snapshots: list[dict] = []

    def fake_accuracy(model, dataset, batch_size, device):
        snapshots.append(copy.deepcopy(model.state_dict()))
        return scores.pop(0)

    monkeypatch.setattr(loop, "_held_out_accuracy", fake_accuracy)
    cfg = TrainConfig(epochs=3, batch_size=32, workers=0, shuffle_buffer=40, threads=1)
    val = DistillDataset(tiny_manifest, "test", shuffle=False)

    def run(out, **kw):
        torch.manual_seed(0)
        model = build_for("cnn_tiny", tiny_manifest)
        train_set = DistillDataset(tiny_manifest, "train", seed=0, shuffle_buffer=40)
        return model, loop.train(model, build_loss("ce"), train_set, cfg, out, val_set=val, **kw)

    scores[:] = [0.5, 0.9, 0.7]
    model, result = run(tmp_path / "a")
    assert (result.selected_epoch, result.val_acc) == (2, 0.9)
    assert [r["val_acc"] for r in result.history] == [0.5, 0.9, 0.7]
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[1][k]), k
    # interrupted after epoch 2 and resumed: the kept checkpoint travels in the resume state
    scores[:] = [0.5, 0.9]
    run(tmp_path / "b", stop_after_epoch=1)
    scores[:] = [0.7]
    model_b, result_b = run(tmp_path / "b", resume=True)
    assert (result_b.selected_epoch, result_b.val_acc) == (2, 0.9)
    for k, v in model_b.state_dict().items():
        assert torch.equal(v, snapshots[1][k]), k


def test_select_last_keeps_the_final_weights(tiny_manifest, tmp_path, monkeypatch):
    import pipeline.training.loop as loop
    from pipeline.losses import build_loss
    from pipeline.models import build_for
    from pipeline.training.dataset import DistillDataset

    scores = iter([0.9, 0.5])
    monkeypatch.setattr(loop, "_held_out_accuracy", lambda *a: next(scores))
    torch.manual_seed(0)
    model = build_for("cnn_tiny", tiny_manifest)
    cfg = TrainConfig(epochs=2, batch_size=32, workers=0, shuffle_buffer=40, threads=1, select="last")
    train_set = DistillDataset(tiny_manifest, "train", seed=0, shuffle_buffer=40)
    val = DistillDataset(tiny_manifest, "test", shuffle=False)
    result = loop.train(model, build_loss("ce"), train_set, cfg, tmp_path / "c", val_set=val)
    assert (result.selected_epoch, result.val_acc) == (2, 0.5)


# ---------------------------------------------------------------------------------------------- teacher check


class _M:  # the manifest fields the check reads
    dataset = "digits"
    num_classes = 10
    classes = tuple(str(i) for i in range(10))
    mean = (0.13,)
    std = (0.31,)


def test_a_wrong_imported_teacher_is_a_user_error():
    """One line and exit 2 at the command line, like every other problem the user fixes."""
    from pipeline.errors import is_user_error

    assert is_user_error(TeacherCheckError("teacher t reaches 11.5% validation top-1 ..., near chance"))


def test_near_chance():
    assert near_chance(0.2, 10) and not near_chance(0.5, 10)
    assert near_chance(0.55, 2) and not near_chance(0.7, 2)


def test_an_imported_teacher_near_chance_is_an_error_naming_class_order_and_normalisation():
    with pytest.raises(TeacherCheckError) as info:
        teacher_check("mine", 0.11, _M(), [], imported=True, checkpoint_meta={"mean": [0.5], "std": [0.5]})
    msg = str(info.value)
    assert "near chance (10.0% for 10 classes)" in msg and "['0', '1'," in msg
    assert "mean [0.13], std [0.31]" in msg and "mean [0.5], std [0.5]" in msg


def test_a_trained_teacher_gets_warnings_not_errors():
    rising = [{"epoch": 1, "val_acc": 0.6}, {"epoch": 2, "val_acc": 0.8}]
    w = teacher_check("cnn", 0.8, _M(), rising, imported=False, n_val=400)
    assert len(w) == 1 and "still improving" in w[0] and "60.0% by epoch 1 -> 80.0% by epoch 2" in w[0]
    # the same 1-point rise: noise on 400 validation images (2 SE = 4 points), a signal on 60,000 (0.3 points)
    noisy = [{"epoch": e, "val_acc": a} for e, a in enumerate([0.5, 0.8, 0.8, 0.81], 1)]
    assert teacher_check("cnn", 0.81, _M(), noisy, imported=False, n_val=400) == []
    assert len(teacher_check("cnn", 0.81, _M(), noisy, imported=False, n_val=60_000)) == 1
    # best-so-far: a dip and a recovery in the last tenth is not "still improving"
    dip = [{"epoch": e, "val_acc": a} for e, a in enumerate([0.5, 0.7, 0.85, 0.80, 0.85], 1)]
    assert teacher_check("cnn", 0.85, _M(), dip, imported=False, n_val=60_000) == []
    flat = [{"epoch": i, "val_acc": a} for i, a in enumerate([0.6, 0.85, 0.9, 0.905], 1)]
    assert teacher_check("cnn", 0.905, _M(), flat, imported=False) == []
    early = [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.8}, {"epoch": 3}, {"epoch": 4}, {"epoch": 5}]
    assert teacher_check("cnn", 0.8, _M(), early, imported=False) == []  # the rise came before half the schedule
    w = teacher_check("cnn", 0.12, _M(), flat[:1], imported=False)
    assert len(w) == 1 and "training failed" in w[0]


def test_train_teacher_records_validation_accuracy_schedule_and_warnings(tmp_path, monkeypatch):
    from stages import prepare, train_teacher

    make_project(tmp_path, tiny_params(teachers={"small": {"arch": "cnn_tiny", "epochs": 2, "lr": 0.1}}))
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    train_teacher.main(["--name", "small"])
    t = json.loads(Path("metrics/teachers/details/small.json").read_text())
    assert 0 <= t["val_accuracy"] <= 1 and isinstance(t["warnings"], list)
    assert t["schedule"]["steps"] == 2 * t["schedule"]["steps_per_epoch"] and t["selected_epoch"] in (1, 2)
    assert [r.get("val_acc") is not None for r in t["history"]] == [True, True]
    assert "test_acc" not in json.dumps(t["history"])  # the test split is for final reporting only


def test_an_imported_checkpoint_with_shuffled_classes_is_refused(tmp_path, monkeypatch):
    """A good teacher whose output classes are permuted (another class order) is caught before teach runs."""
    from pipeline.models import load_model, save_model
    from stages import prepare, train_teacher

    params = tiny_params(teachers={"small": {"arch": "cnn_tiny", "steps": 150, "lr": 0.1}})
    make_project(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    train_teacher.main(["--name", "small"])
    assert json.loads(Path("metrics/teachers/small.json").read_text())["val_accuracy"] > 0.8
    model, meta = load_model("data/teachers/small.safetensors")
    head = model.net.classifier
    with torch.no_grad():  # reverse the class order of the last layer: same network, wrong labels
        head.weight.copy_(head.weight.flip(0))
        head.bias.copy_(head.bias.flip(0))
    save_model(tmp_path / "shuffled.pt", model, "cnn_tiny")
    params["teachers"]["mine"] = {"arch": "cnn_tiny", "checkpoint": str(tmp_path / "shuffled.pt")}
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(TeacherCheckError, match=r"teacher mine reaches .* near chance.*another class order"):
        train_teacher.main(["--name", "mine"])
