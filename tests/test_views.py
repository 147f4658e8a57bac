"""Consistent teaching: the student's augmented input is bit for bit the teacher's."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.cache.budget import BudgetSpec
from pipeline.cache.teach import build_spec, load_shard, run_teach
from pipeline.data.shards import iter_shard
from pipeline.data.views import PadCropFlip, hash_u64, pick_view
from pipeline.models import to_input
from pipeline.training.dataset import DistillDataset
from pipeline.training.transport import make_loader
from tests.conftest import check_student_inputs, teacher_inputs


def test_view_zero_is_identity():
    imgs = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    out = PadCropFlip(views=4, seed=3, pad=2, flip=True).apply(imgs, np.arange(5), np.zeros(5, int))
    assert np.array_equal(out, imgs)


def test_views_are_pure_functions_of_seed_index_view():
    r = PadCropFlip(views=4, seed=7, pad=4, flip=True)
    idx = np.arange(1000)
    a = r.params(idx, np.full(1000, 2))
    b = r.params(idx[::-1], np.full(1000, 2))
    for x, y in zip(a, b, strict=False):
        assert np.array_equal(x, y[::-1])  # order/batching does not matter
    c = PadCropFlip(views=4, seed=8, pad=4, flip=True).params(idx, np.full(1000, 2))
    assert not np.array_equal(a[0], c[0])  # the seed does
    dy, dx, flip = a
    assert dy.min() == 0 and dy.max() == 8 and dx.min() == 0 and dx.max() == 8
    assert 0.4 < flip.mean() < 0.6


def test_crop_and_flip_match_a_direct_implementation():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (1, 6, 5, 1), dtype=np.uint8)
    r = PadCropFlip(views=3, seed=0, pad=2, flip=True)
    for i in range(50):
        dy, dx, flip = (int(x[0]) if x.dtype != bool else bool(x[0]) for x in r.params(np.array([i]), np.array([1])))
        padded = np.zeros((10, 9, 1), np.uint8)
        padded[2:8, 2:7] = img[0]
        want = padded[dy : dy + 6, dx : dx + 5]
        if flip:
            want = want[:, ::-1]
        assert np.array_equal(r.apply(img, np.array([i]), np.array([1]))[0], want)


@given(seed=st.integers(0, 2**31), epoch=st.integers(0, 1000), views=st.integers(1, 8))
@settings(max_examples=30, deadline=None)
def test_pick_view_in_range_and_deterministic(seed, epoch, views):
    idx = np.arange(200)
    v = pick_view(seed, epoch, idx, views)
    assert v.min() >= 0 and v.max() < views
    assert np.array_equal(v, pick_view(seed, epoch, idx, views))
    if views > 1:
        assert len(np.unique(v)) > 1


def test_hash_broadcasts():
    assert hash_u64(1, 2, np.arange(3)).shape == (3,)
    assert hash_u64(1, 2, 3) != hash_u64(1, 3, 2)


def test_student_input_equals_teacher_input_bit_for_bit(fresh_manifest, tmp_path):
    """Capture what the teacher saw while caching and what the student gets from the loader."""
    m = fresh_manifest
    recipes = {"train": PadCropFlip(3, 5, 2, True), "test": PadCropFlip(1, 5, 2, True)}

    class Spy(torch.nn.Module):
        """Records each input image, keyed by (index, view) via the order shard_logits feeds them."""

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16 * 16, 4)

        def forward(self, x):
            self.last = x.clone()
            return self.lin(x.flatten(1))

    spy = Spy()
    calls = []
    orig_forward = spy.forward

    def record(x):
        calls.append(x.clone())
        return orig_forward(x)

    spy.forward = record
    spec = build_spec(
        m,
        {"name": "spy", "arch": "x", "weights_sha256": "0"},
        recipes,
        dtype="float32",
        topk=0,
        compressor="none",
        chunk_rows=64,
        budget=BudgetSpec(),
    )
    run_teach(m, spy, tmp_path / "spy.zarr", spec, recipes, batch_size=1000)
    seen = teacher_inputs(m, spec, recipes, calls)  # (split, index, view) -> what the teacher saw
    ds = DistillDataset(m, "train", tmp_path / "spy.zarr", seed=11, shuffle_buffer=50)
    assert check_student_inputs(ds, seen, batch_size=32) == 2 * m.split("train").n
    # And the cached logits the student gets are the teacher's output on that very input.
    batch = next(iter(make_loader(ds, 16, workers=0)))
    with torch.no_grad():
        want = spy.lin(to_input(batch["image"]).flatten(1))
    torch.testing.assert_close(batch["logits"], want, rtol=0, atol=1e-6)


def test_teach_reads_the_images_the_loader_reads(tiny_manifest):
    i, img, _ = next(iter_shard(tiny_manifest.root / tiny_manifest.split("train").shards[0].path))
    batch = load_shard(tiny_manifest, "train", 0)
    assert batch.keys[0] == f"{i:08d}" and np.array_equal(batch.images[0], img)
