"""The training loop: interrupted + resumed == uninterrupted, curves, checkpoint errors, online teacher mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import OptimConfig, TrainConfig
from pipeline.data.shards import Manifest
from pipeline.layout import Layout
from pipeline.losses import build_loss
from pipeline.models import build_for, save_model, to_input
from pipeline.training.dataset import DistillDataset
from pipeline.training.loop import train
from pipeline.training.resume import STATE_JSON, load_state
from pipeline.training.transport import make_loader
from tests.conftest import cached_tiny, linear_teacher, make_project, tiny_params


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path, torch.nn.Module]:
    """5 train shards (the last one short) cached by a fixed random cnn_tiny teacher, 2 views, float16."""
    return cached_tiny(tmp_path_factory.mktemp("train"))


def cfg(epochs: int = 2, workers: int = 0) -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        batch_size=32,
        workers=workers,
        shuffle_buffer=40,
        seed=0,
        threads=1,
        optim=OptimConfig(lr=0.05, warmup_epochs=0.5, grad_clip=5.0, label_smoothing=0.0),
        eval_every=1,
    )


def student(m: Manifest, arch: str = "cnn_tiny", dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(123)
    model = build_for(arch, m)
    # Dropout on the logits draws from the global torch RNG every step: resume must restore that stream.
    return torch.nn.Sequential(model, torch.nn.Dropout(dropout)) if dropout else model


def run(data, out: Path, loss: str, workers: int, **kw) -> tuple[torch.nn.Module, list[dict]]:
    """Train a fresh seeded student (kw["arch"] names it and picks the zoo network, default cnn_tiny)."""
    m, store, _ = data
    model = student(m, kw.get("arch") or "cnn_tiny", kw.pop("dropout", 0.0))
    loss_fn = build_loss(loss, **({"T": 4.0} if loss != "ce" else {}))
    train_set = DistillDataset(m, "train", store, seed=0, shuffle_buffer=40)
    held = DistillDataset(m, "test", shuffle=False)  # this tiny data set has no val split: any held-out split works
    return model, train(model, loss_fn, train_set, cfg(workers=workers), out, val_set=held, **kw).history


@pytest.mark.parametrize(
    ("loss", "workers", "dropout"), [("kd", 0, 0.0), ("kd", 1, 0.0), ("ckd", 0, 0.0), ("ckd", 1, 0.0), ("kd", 1, 0.2)]
)
def test_interrupted_and_resumed_equals_uninterrupted(data, tmp_path, loss, workers, dropout):
    full, hist_full = run(data, tmp_path / "full", loss, workers, dropout=dropout)
    run(data, tmp_path / "cut", loss, workers, stop_after_epoch=0, dropout=dropout)
    first = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [r["epoch"] for r in first] == [1]
    # A fresh process would build the model from scratch: the checkpoint must carry everything else.
    torch.manual_seed(999)  # the global RNG state at resume must not matter either
    resumed, hist_res = run(data, tmp_path / "cut", loss, workers, resume=True, dropout=dropout)
    want, got = full.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)
    assert [r["epoch"] for r in hist_res] == [1, 2]
    for a, b in zip(hist_full, hist_res, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_acc"] == b["val_acc"]


def test_curves_have_loss_parts_accuracy_and_lr(data, tmp_path):
    _, hist = run(data, tmp_path / "kd", "kd", 0, run_log=tmp_path / "logs" / "kd.json")
    on_disk = json.loads((tmp_path / "kd" / "history.json").read_text())
    assert on_disk == hist and [r["epoch"] for r in hist] == [1, 2]
    for row in hist:
        for key in ("lr", "train_loss", "train_ce", "train_kd", "train_acc", "val_acc", "steps"):
            assert key in row and np.isfinite(row[key]), key
        assert 0 <= row["train_acc"] <= 1 and 0 <= row["val_acc"] <= 1
        # wall-clock values vary between identical runs: they live in the run log, never in the history
        assert not {"samples_per_s", "data_wait_s", "seconds"} & set(row)
    timings = json.loads((tmp_path / "logs" / "kd.json").read_text())
    assert [t["epoch"] for t in timings] == [1, 2]
    assert all(t["samples_per_s"] > 0 and t["data_wait_s"] >= 0 and t["seconds"] > 0 for t in timings)
    assert hist[0]["lr"] > hist[1]["lr"] >= 0  # cosine decays to 0 at the end
    # steps: 5 shards of 64/64/64/64/44 at batch 32 -> 2+2+2+2+2 batches
    assert hist[0]["steps"] == 10
    state = load_state(tmp_path / "kd" / "resume")  # safetensors + JSON: nothing unpickled
    assert state["fingerprint"]["arch"] == "cnn_tiny" or state["fingerprint"]["arch"].startswith("PlainCNN#")
    assert state["epoch"] == 1 and state["world_size"] == 1 and state["history"] == hist
    assert sorted(p.name for p in (tmp_path / "kd" / "resume").iterdir()) == ["resume-00001.safetensors", STATE_JSON]


def test_resume_without_checkpoint_is_a_clear_error(data, tmp_path):
    out = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match=r"--resume: no resume state in .*nothing/resume.*run without --resume"):
        run(data, out, "kd", 0, resume=True)
    assert not out.exists()  # nothing written


def _state_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_state_of_another_run_is_refused_naming_the_keys_or_set_aside(data, tmp_path):
    """--resume with another architecture, loss, or learning rate: refused naming what differs, nothing overwritten;
    automatic resume (the stages' default) starts over instead."""
    out = tmp_path / "s"
    run(data, out, "kd", 0, arch="cnn_tiny", stop_after_epoch=0)
    before = _state_bytes(out / "resume")
    with pytest.raises(ValueError, match=r"belongs to another run: it differs in \['arch'\]"):
        run(data, out, "kd", 0, arch="cnn_small", resume=True)
    m, store, _ = data
    train_set = DistillDataset(m, "train", store, seed=0, shuffle_buffer=40)
    fast = cfg()
    fast = TrainConfig(**{**fast.__dict__, "optim": OptimConfig(lr=0.5, warmup_epochs=0.5, grad_clip=5.0)})
    loss = {"loss": "ce"}
    with pytest.raises(ValueError, match=r"differs in \['loss', 'loss_fn', 'train.optim.lr'\]"):
        train(student(m), build_loss("ce"), train_set, fast, out, resume=True, arch="cnn_tiny", fingerprint=loss)
    assert _state_bytes(out / "resume") == before  # nothing overwritten
    # automatic: another run's state is set aside (a warning), the run starts over and ends like a fresh one
    _, hist = run(data, tmp_path / "fresh", "ce", 0, arch="cnn_tiny")
    _, auto = run(data, out, "ce", 0, arch="cnn_tiny", resume="auto")
    assert [r["epoch"] for r in auto] == [1, 2] and auto == hist


def test_a_crafted_or_altered_state_is_refused_without_running_anything(data, tmp_path):
    """The state is data (JSON + safetensors): a pickle planted where it lives is just an unreadable file, and an
    altered tensor file fails its recorded sha256."""
    import pickle

    out = tmp_path / "s"
    run(data, out, "kd", 0, stop_after_epoch=0)
    folder = out / "resume"
    tensors = next(folder.glob("*.safetensors"))
    raw = bytearray(tensors.read_bytes())
    raw[-1] ^= 1
    tensors.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match its sha256"):
        run(data, out, "kd", 0, resume=True)

    class Boom:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").touch, ())

    (folder / STATE_JSON).write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ValueError, match="not readable JSON"):
        run(data, out, "kd", 0, resume=True)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------
# online mode


def test_online_teacher_logits_equal_cached_ones_for_the_same_views(data):
    m, store, teacher = data
    ds = DistillDataset(m, "train", store, seed=4, shuffle_buffer=40)
    teacher = teacher.eval().to(memory_format=torch.channels_last)
    views = set()
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for batch in make_loader(ds, 64, workers=0):
            with torch.no_grad():
                live = teacher(to_input(batch["image"]))  # (B, C) on the very view the cache holds
            torch.testing.assert_close(batch["logits"], live, rtol=2e-3, atol=2e-3)  # float16 store
            views |= set(batch["view"].tolist())
    assert views == {0, 1}  # augmented views were compared too


def test_online_mode_trains_like_cached_mode(data, tmp_path):
    m, store, teacher = data
    _, cached = run(data, tmp_path / "cache", "kd", 0)
    _, online = run(data, tmp_path / "online", "kd", 0, teacher=linear_teacher(m, seed=1))
    for a, b in zip(cached, online, strict=True):
        assert np.isfinite(b["train_loss"])
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=2e-2)  # only float16 rounding differs
        assert b["train_kd"] == pytest.approx(a["train_kd"], rel=2e-2)


def test_distill_stage_online_mode_and_resume_errors(tmp_path, monkeypatch):
    """`distill.teacher_source: online` end to end through the stage, and its --resume errors."""
    from stages import distill, prepare, teach

    params = tiny_params()
    params["distill"]["teacher_source"] = "online"
    make_project(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    from pipeline.data.shards import load_manifest

    m = load_manifest("data/shards/tiny")
    Path("data/teachers").mkdir(parents=True)
    save_model(Layout("tiny").teacher_checkpoint("small"), linear_teacher(m).cpu(), "cnn_tiny")
    teach.main(["--name", "small"])
    with pytest.raises(FileNotFoundError, match="no resume state"):
        distill.main(["--teacher", "small", "--loss", "kd", "--resume"])
    assert not Layout("tiny").student_model("small-kd-full-0").exists()
    distill.main(["--teacher", "small", "--loss", "kd"])
    curves = json.loads(Path("plots/curves/small-kd-full-0.json").read_text())
    assert np.isfinite(curves[-1]["train_loss"]) and "val_acc" in curves[-1]
    assert not Layout("tiny").resume_state("distill", "small-kd-full-0").exists()  # finished: nothing to resume


@pytest.mark.parametrize(
    ("loss", "workers", "unqueried"), [("cmkd", 0, None), ("dkd+cmkd", 1, None), ("cmkd", 1, "ce")]
)
def test_loader_precomputed_teacher_features_train_exactly_like_inline_ones(
    data, tmp_path, monkeypatch, loss, workers, unqueried
):
    """CMKD's teacher side computed by the loader's worker ("tf/*" batch keys) == computed inside the loss."""
    m, store, _ = data
    kw: dict = {}
    if unqueried:  # half the rows have no teacher answer: features must be masked like the logits
        allowed = np.zeros((m.split("train").n, 2), dtype=bool)
        allowed[::2] = True
        kw = {"allowed": allowed, "unqueried": unqueried}
    import pipeline.training.loop as train_mod

    used: list[bool] = []
    orig = train_mod.compute_loss

    def spy(*a, **k):
        used.append(k.get("features") is not None)
        return orig(*a, **k)

    monkeypatch.setattr(train_mod, "compute_loss", spy)
    models = []
    for precompute in (False, True):
        used.clear()
        model = student(m)
        loss_fn = build_loss(loss)
        features = loss_fn.teacher_features if precompute else None
        train_set = DistillDataset(m, "train", store, seed=0, shuffle_buffer=40, teacher_features=features, **kw)
        if precompute:
            batch = next(iter(make_loader(train_set, 32, workers)))
            feats = {k[3:]: v for k, v in batch.items() if k.startswith("tf/")}
            assert sorted(feats) == sorted(loss_fn.feature_names) and feats
            logits = torch.where(batch["has_teacher"][:, None], batch["logits"], 0.0)
            for k, v in loss_fn.teacher_features(logits).items():
                assert torch.equal(feats[k], v), k
        train(model, loss_fn, train_set, cfg(epochs=1, workers=workers), tmp_path / f"{loss}-{precompute}")
        assert used and all(u == precompute for u in used)  # the loss got the loader's features, or computed its own
        models.append(model.state_dict())
    for k in models[0]:
        assert torch.equal(models[0][k], models[1][k]), k
