"""The GPU-ready data path (issue 19): one packed transfer per batch, prefetch, no host sync per step, phase timer.

CUDA is absent here, so the device-only parts are tested through their CPU-testable pieces: the packing
(forced on CPU), the prefetch's pass-through on CPU, and the absence of per-step syncs, counted: every
tensor method that makes the host wait for a device (`item`, `tolist`, `cpu`, `bool()`, `int()`, `float()`)
is patched to count calls in the training process, and the count must not grow with the number of steps.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import OptimConfig, TrainConfig
from pipeline.data.shards import Manifest
from pipeline.losses import build_loss
from pipeline.models import build_for
from pipeline.training.dataset import DistillDataset
from pipeline.training.loop import compute_loss, train
from pipeline.training.phases import NO_TIMER, PHASES, PhaseTimer
from pipeline.training.transport import HOST_FIELDS, make_loader, pack_to_device, prefetch_to_device
from tests.conftest import cached_tiny

SYNC_METHODS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path]:
    m, store, _ = cached_tiny(tmp_path_factory.mktemp("device"), n_train=320, n_test=32)
    return m, store


def _cfg(steps: int, workers: int = 1) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=16,
        workers=workers,
        shuffle_buffer=32,
        seed=0,
        threads=1,
        optim=OptimConfig(lr=0.05, warmup_epochs=0.0, grad_clip=5.0),
        eval_every=0,
    )


def _count_syncs(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **kw):
            counts[_name] += 1
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


@pytest.mark.parametrize("loss", ["ce", "kd"])
def test_the_training_loop_makes_no_host_sync_per_step(data, tmp_path, monkeypatch, loss):
    """3 steps and 15 steps of one epoch make the same number of sync calls: they happen per epoch, not per step."""
    m, store = data
    seen = {}
    for steps in (3, 15):
        torch.manual_seed(0)
        model = build_for("cnn_tiny", m)
        ds = DistillDataset(m, "train", None if loss == "ce" else store, seed=0, shuffle_buffer=32)
        with monkeypatch.context() as mp:
            counts = _count_syncs(mp)
            result = train(model, build_loss(loss), ds, _cfg(steps), tmp_path / f"{loss}{steps}", desc=loss)
        assert sum(r["steps"] for r in result.history) == steps
        seen[steps] = dict(counts)
    assert seen[3] == seen[15], f"sync calls grow with the steps: {seen}"


def test_compute_loss_with_a_partial_teacher_mask_makes_no_sync_and_matches_boolean_masking(monkeypatch):
    torch.manual_seed(0)
    s = torch.randn(12, 5, requires_grad=True)
    t, y = torch.randn(12, 5), torch.randint(0, 5, (12,))
    has = torch.tensor([True, False, True, True, False, True, False, True, True, True, False, True])
    kd = build_loss("kd", T=4.0)
    with monkeypatch.context() as mp:
        counts = _count_syncs(mp)
        parts = compute_loss(kd, s, t, y, has, 0.0, 0.0)
        (g,) = torch.autograd.grad(parts["loss"], s)
    assert not counts, f"host syncs in compute_loss: {dict(counts)}"
    # reference: the boolean-mask formulation, by hand
    s2 = s.detach().clone().requires_grad_(True)
    frac = has.float().mean()
    ref = frac * kd(s2[has], t[has], y[has])["loss"] + (1 - frac) * torch.nn.functional.cross_entropy(s2[~has], y[~has])
    (g2,) = torch.autograd.grad(ref, s2)
    torch.testing.assert_close(parts["loss"], ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(g, g2, rtol=0, atol=1e-7)
    # no teacher row at all: CE on every row; the numpy mask works as the tensor one
    none = compute_loss(kd, s, t, y, np.zeros(12, dtype=bool), 0.0, 0.0)
    torch.testing.assert_close(none["loss"], torch.nn.functional.cross_entropy(s, y))


def test_pack_to_device_sends_every_device_field_in_one_buffer_and_keeps_host_fields():
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randint(0, 256, (5, 7, 3, 1), dtype=torch.uint8, generator=g),  # odd byte count: alignment
        "label": torch.randint(0, 10, (5,), generator=g),
        "logits": torch.randn(5, 10, generator=g),
        "members": torch.randn(5, 2, 10, generator=g).half(),
        "tf/z": torch.randn(5, 10, generator=g).double(),
        "has_teacher": torch.tensor([True, False, True, True, True]),
        "index": torch.arange(5),
        "view": torch.zeros(5, dtype=torch.long),
    }
    out = pack_to_device(batch, torch.device("cpu"), pack=True)
    assert set(out) == set(batch)
    moved = [k for k in batch if k not in HOST_FIELDS]
    for k in batch:
        assert out[k].dtype == batch[k].dtype and out[k].shape == batch[k].shape, k
        assert torch.equal(out[k], batch[k]), k
    for k in HOST_FIELDS & set(batch):
        assert out[k] is batch[k], f"host field {k} was moved"
    # one buffer: every moved field is a view of the same storage, at an aligned offset
    ptrs = {out[k].untyped_storage().data_ptr() for k in moved}
    assert len(ptrs) == 1
    assert all(out[k].data_ptr() % 16 == 0 for k in moved)
    assert pack_to_device(batch, torch.device("cpu")) is batch  # default on CPU: nothing to move


def test_prefetch_passes_cpu_batches_through_unchanged(data):
    m, store = data
    ds = DistillDataset(m, "train", store, seed=0, shuffle_buffer=32)
    ds.set_epoch(0)
    direct = list(make_loader(ds, 16, 0))
    ds.set_epoch(0)
    fetched = list(prefetch_to_device(iter(make_loader(ds, 16, 0)), torch.device("cpu")))
    assert len(direct) == len(fetched) > 0
    for a, b in zip(direct, fetched, strict=True):
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_phase_timer_accounts_for_every_step_and_does_not_change_training(data, tmp_path):
    m, store = data
    results = []
    for timer in (None, PhaseTimer("cpu")):
        torch.manual_seed(0)
        model = build_for("cnn_tiny", m)
        ds = DistillDataset(m, "train", store, seed=0, shuffle_buffer=32)
        train(model, build_loss("kd"), ds, _cfg(6, workers=0), tmp_path / str(timer is None), phases=timer)
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert timer.batches == 6
    ms = timer.per_batch_ms()
    assert list(ms) == list(PHASES) and all(v >= 0 for v in ms.values())
    assert ms["forward"] > 0 and ms["backward"] > 0 and ms["optimizer"] > 0
    NO_TIMER.lap("forward")  # the default timer records nothing
    assert NO_TIMER.batches == 0 and not NO_TIMER.seconds


def test_forkserver_and_fork_workers_train_the_same_weights(data, tmp_path):
    """The workers' start method changes where they live, never what they yield."""
    import dataclasses

    m, store = data
    weights = []
    for start in ("forkserver", "fork"):
        torch.manual_seed(0)
        model = build_for("cnn_tiny", m)
        ds = DistillDataset(m, "train", store, seed=0, shuffle_buffer=32)
        cfg = dataclasses.replace(_cfg(8, workers=2), worker_start=start)
        train(model, build_loss("kd"), ds, cfg, tmp_path / start)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
