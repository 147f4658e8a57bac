"""View recipes (`pipeline.data.views.RECIPES`) on shards that keep a source's own JPEG bytes, images of any size.

Golden behaviour comes from torchvision itself: the `rrc_flip` box distribution against
`transforms.RandomResizedCrop.get_params` (two-sample Kolmogorov-Smirnov), its central fallback exactly, the eval
view against `v2.Resize` + `v2.CenterCrop`; and the consistent-teaching property for every recipe: the student's input
is bit for bit the image the teacher labelled.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from pipeline.cache.budget import BudgetSpec
from pipeline.cache.teach import build_spec, run_teach, view_recipes
from pipeline.config import AugmentConfig, ConfigError, TeachConfig, TrainTeacherConfig, from_dict
from pipeline.data.shards import Encoded, iter_shard, read_rows, write_dataset
from pipeline.data.tario import decode_jpeg
from pipeline.data.views import (
    FRESH_VIEWS,
    MIX_WINDOW,
    Mix,
    PadCropFlip,
    ResizedCropFlip,
    ViewRecipe,
    build_recipe,
    check_recipe,
)
from pipeline.models import to_input
from pipeline.training.dataset import DistillDataset
from pipeline.training.transport import make_loader
from tests.conftest import check_student_inputs, teacher_inputs


def _jpeg(h: int, w: int, seed: int, mode: str = "RGB") -> bytes:
    """A smooth random image (so JPEG keeps detail) encoded as a JPEG."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


SIZES = [(64, 48), (300, 200), (120, 340), (20, 15), (256, 256), (97, 131)]  # tiny (< crop) to larger than 224


@pytest.fixture(scope="module")
def jpeg_data(tmp_path_factory: pytest.TempPathFactory):
    """Shards of JPEGs of mixed sizes, written with their bytes kept; returns (manifest, {(split, i): bytes})."""
    files: dict[tuple[str, int], bytes] = {}
    splits = {}
    for split, n in (("train", 30), ("test", 12)):
        items = []
        for i in range(n):
            h, w = SIZES[i % len(SIZES)]
            data = _jpeg(h, w, seed=1000 * (split == "test") + i)
            files[(split, i)] = data
            items.append((Encoded(data, "jpg", decode_jpeg(data)), i % 3))
        splits[split] = items
    m = write_dataset(tmp_path_factory.mktemp("jpeg") / "mixed", "mixed", splits, ["a", "b", "c"], shard_size=8)
    return m, files


def test_kept_jpeg_bytes_and_sizes_in_the_manifest(jpeg_data):
    m, files = jpeg_data
    assert m.image_shape == (None, None, 3) and not m.uniform
    sizes = m.sizes("train")
    assert [tuple(s) for s in sizes[:6]] == SIZES
    for shard in m.split("train").shards:
        for i, data, _ in iter_shard(m.root / shard.path, expect=range(shard.start, shard.stop), decode=False):
            assert bytes(data) == files[("train", i)]  # the member is the source file, byte for byte
    images, _ = read_rows(m, "train", np.array([3, 1]))
    assert [im.shape for im in images] == [(20, 15, 3), (300, 200, 3)]


def test_pad_crop_flip_refuses_images_of_many_sizes(jpeg_data):
    m, _ = jpeg_data
    with pytest.raises(ConfigError, match="differ in size.*rrc_flip"):
        view_recipes(TeachConfig(), m)
    assert check_recipe(ResizedCropFlip(size=32), m, "teach.augment") == (32, 32, 3)


class _Spy(torch.nn.Module):
    """A teacher that records every input batch it is given (any image size: global pooling)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(1, num_classes)
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.clone())
        return self.lin(x.mean((1, 2, 3))[:, None])


RECIPE_CASES = {
    "rrc_flip": lambda views: ResizedCropFlip(views=views, seed=5, size=224),
    "pad_crop_flip": lambda views: PadCropFlip(views=views, seed=5, pad=2),
    "rrc_flip+mixup+cutmix": lambda views: ResizedCropFlip(views=views, seed=5, size=224, mix=Mix(0.8, 1.0)),
    "pad_crop_flip+cutmix": lambda views: PadCropFlip(views=views, seed=5, pad=2, mix=Mix(cutmix_alpha=1.0)),
    "rrc_flip+trivial_augment": lambda views: ResizedCropFlip(
        views=views, seed=5, size=224, photometric="trivial_augment"
    ),
}


@pytest.mark.parametrize("recipe", list(RECIPE_CASES))
def test_student_input_equals_teacher_input_bit_for_bit(recipe, jpeg_data, fresh_manifest, tmp_path):
    """Every recipe, at 224 px from JPEG shards (rrc_flip) or 16 px PNG shards (pad_crop_flip); with Mixup/CutMix
    the teacher labelled the very mixed image, and the batch carries the partner's label and the weight."""
    m = jpeg_data[0] if recipe.startswith("rrc") else fresh_manifest
    make = RECIPE_CASES[recipe]
    recipes = {"train": make(3), "test": make(1)}
    spy = _Spy(m.num_classes)
    spec = build_spec(m, {"name": "spy", "arch": "x", "weights_sha256": "0"}, recipes, dtype="float32",
                      compressor="none", chunk_rows=8, budget=BudgetSpec())  # fmt: skip
    run_teach(m, spy, tmp_path / "spy.zarr", spec, recipes, batch_size=1000)
    seen = teacher_inputs(m, spec, recipes, spy.calls)  # (split, index, view) -> what the teacher saw
    ds = DistillDataset(m, "train", tmp_path / "spy.zarr", seed=11, shuffle_buffer=8)
    assert ds.recipe == recipes["train"]  # the store's recipe, read back
    assert check_student_inputs(ds, seen, batch_size=8) == 2 * m.split("train").n
    if recipes["train"].mix is not None:  # the CE's mixed target: the partner's label and the plan's weight
        labels = m.iter_labels("train")
        hw = recipes["train"].out_shape(m.image_shape)[:2]
        mixed = 0
        for batch in make_loader(ds, 8, workers=0):
            idx, view = batch["index"].numpy(), batch["view"].numpy()
            plan = recipes["train"].mix.plan(5, idx, view, m.shard_size, m.split("train").n, hw)
            partner = np.where(plan.partner >= 0, plan.partner, idx)
            assert np.array_equal(batch["mix_label"].numpy(), labels[partner])
            np.testing.assert_allclose(batch["mix_lam"].numpy(), plan.lam, rtol=1e-6)
            mixed += int((plan.lam < 1).sum())
        assert mixed > 0
    # the test split's only view is the eval transform, as the evaluation loaders make it
    test = DistillDataset(m, "test", shuffle=False, recipe=recipes["test"])
    batch = next(iter(make_loader(test, 100, workers=0)))
    for j in range(len(batch["index"])):
        assert torch.equal(to_input(batch["image"])[j : j + 1][0], seen[("test", int(batch["index"][j]), 0)])


def test_eval_view_is_torchvision_resize_and_centre_crop(jpeg_data):
    m, _ = jpeg_data
    images, _ = read_rows(m, "train", np.arange(6))
    r = ResizedCropFlip(size=224)  # crop_pct 0.875: resize 256, centre crop 224
    out = r.apply(images, np.arange(6), np.zeros(6, dtype=np.int64))
    tv = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])  # torchvision's uint8 path
    for img, got in zip(images, out, strict=True):
        want = tv(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        assert np.array_equal(got, want)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


@pytest.mark.parametrize(("height", "width", "scale"), [(375, 500, (0.08, 1.0)), (64, 300, (0.35, 1.0))])
def test_rrc_box_distribution_matches_torchvision(height, width, scale):
    """Area fraction, log aspect, offsets and fallback rate ~ torchvision's get_params (KS at alpha 1e-3)."""
    n = 20_000
    r = ResizedCropFlip(views=2, seed=3, size=224, scale=scale)
    keys = r.row_params(np.arange(n), np.ones(n, dtype=np.int64))
    ours = np.array([r.box(k, height, width)[:4] for k in keys], dtype=np.float64)  # (n, 4) top, left, h, w
    torch.manual_seed(0)
    img = torch.zeros(1, height, width)
    theirs = np.array([T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)], float)
    crit = 1.95 * math.sqrt(2 / n)  # KS critical value, alpha = 0.001

    def stats(b: np.ndarray) -> dict[str, np.ndarray]:
        top, left, h, w = b.T
        return {
            "area": h * w / (height * width),
            "log_aspect": np.log(w / h),
            "top": top / np.maximum(height - h, 1),
            "left": left / np.maximum(width - w, 1),
        }

    so, st_ = stats(ours), stats(theirs)
    for key in so:
        assert _ks(so[key], st_[key]) < crit, key
    # the share of central fallbacks (boxes whose offsets are exactly central and not drawn) agrees too
    flips = np.array([r.box(k, height, width)[4] for k in keys[:4000]])
    assert abs(flips.mean() - 0.5) < 0.03


def test_rrc_fallback_is_torchvision_central_crop():
    """When no try fits (scale near 1 on a very wide/tall image), the box is torchvision's central crop."""
    r = ResizedCropFlip(size=32, scale=(0.95, 1.0))
    for height, width in [(10, 1000), (1000, 10), (50, 51)]:
        img = torch.zeros(1, height, width)
        want = T.RandomResizedCrop.get_params(img, [0.95, 1.0], [3 / 4, 4 / 3]) if height != 50 else None
        for key in r.row_params(np.arange(50), np.ones(50, dtype=np.int64)):
            got = r.box(key, height, width)[:4]
            if want is not None:
                assert got == want  # extreme aspect: every try fails, torchvision's fallback box exactly
            else:
                top, left, h, w = got
                assert top >= 0 and top + h <= height and left >= 0 and left + w <= width


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 4000),
    st.integers(1, 4000),
    st.floats(0.01, 1.0),
    st.floats(0.0, 1.0),
    st.floats(0.2, 1.0),
    st.floats(1.0, 5.0),
    st.integers(0, 2**62),
)
def test_rrc_box_always_inside_the_image(height, width, lo, span, rlo, rhi, key):
    r = ResizedCropFlip(size=8, scale=(lo, lo + (1 - lo) * span), ratio=(rlo, rhi))
    top, left, h, w, _ = r.box(key, height, width)
    assert h > 0 and w > 0 and top >= 0 and top + h <= height and left >= 0 and left + w <= width


def test_recipes_round_trip_through_the_store_spelling():
    pad = PadCropFlip(views=2, seed=1, pad=2, flip=True)
    assert pad.to_dict() == {"views": 2, "seed": 1, "transform": {"pad": 2, "flip": True}}  # stores made before
    assert ViewRecipe.from_dict(pad.to_dict()) == pad
    rrc = ResizedCropFlip(views=4, seed=2, size=32, scale=(0.35, 1), crop_pct=1.0)
    assert ViewRecipe.from_dict(rrc.to_dict()) == rrc
    assert "rrc_flip(size=32" in rrc.describe()
    with pytest.raises(ValueError, match="unknown view recipe 'rrc'"):
        build_recipe({"recipe": "rrc"}, views=1, seed=0)
    with pytest.raises(ValueError, match="has no option"):
        build_recipe({"recipe": "rrc_flip", "size": 8, "pad": 2}, views=1, seed=0)


def test_params_spell_recipes_and_refuse_the_other_recipes_keys():
    assert TrainTeacherConfig().augment.spec() == {"pad": 4, "flip": True}  # what teachers always trained with
    assert ViewRecipe.fresh(seed=3, **TrainTeacherConfig().augment.spec()) == PadCropFlip(FRESH_VIEWS, 3, 4, True)
    a = from_dict(AugmentConfig, {"recipe": "rrc_flip", "size": 32, "scale": [0.35, 1]}, "teach.augment")
    assert build_recipe(a.spec(), views=2, seed=0) == ResizedCropFlip(views=2, size=32, scale=(0.35, 1.0))
    with pytest.raises(ConfigError, match="pad_crop_flip takes pad and flip, not \\['size'\\]"):
        from_dict(AugmentConfig, {"size": 32}, "teach.augment")
    with pytest.raises(ConfigError, match="rrc_flip needs size"):
        from_dict(AugmentConfig, {"recipe": "rrc_flip"}, "teach.augment")
    off = from_dict(AugmentConfig, {"flip": False}, "train_teacher.augment")
    r = build_recipe(off.spec(), views=FRESH_VIEWS, seed=0)
    assert not r.params(np.arange(1000), np.ones(1000, dtype=np.int64))[2].any()  # flip off: no mirrored digit


def test_mix_partners_and_weights_are_the_same_for_any_workers_and_ranks(fresh_manifest, tmp_path):
    """The (index, view) -> (image, partner label, weight) map of an epoch: one process == 2 workers == 2 ranks."""
    m = fresh_manifest
    recipe = PadCropFlip(views=FRESH_VIEWS, seed=2, pad=2, mix=Mix(0.8, 1.0))

    def collect(ds, workers=0) -> dict:
        out = {}
        for batch in make_loader(ds, 16, workers=workers):
            for j in range(len(batch["index"])):
                key = (int(batch["index"][j]), int(batch["view"][j]))
                out[key] = (batch["image"][j].numpy().tobytes(), int(batch["mix_label"][j]), float(batch["mix_lam"][j]))
        return out

    ds = DistillDataset(m, "train", seed=3, recipe=recipe, augment=True, shuffle_buffer=16)
    one = collect(ds)
    assert collect(ds, workers=2) == one
    ranks = {}
    for rank in (0, 1):
        ds.node = (rank, 2)  # what DDP rank `rank` of 2 streams (its share of the shards)
        ranks.update(collect(ds))
    assert ranks == one and len(one) == m.split("train").n
    assert sum(lam < 1 for _, _, lam in one.values()) > len(one) // 2  # most views are mixed (prob 1)


def test_mix_plan_partner_stays_in_its_window_and_shard():
    mix = Mix(mixup_alpha=0.8)
    index = np.arange(0, 300)
    plan = mix.plan(0, index, np.ones_like(index), shard_rows=100, n=300, hw=(8, 8))
    shard = index // 100
    window = shard * 100 + (index - shard * 100) // MIX_WINDOW * MIX_WINDOW
    ok = plan.partner >= 0
    assert ok.all() and (plan.partner != index).all()
    assert (plan.partner // 100 == shard).all() and (plan.partner >= window).all()
    assert (plan.partner < np.minimum(window + MIX_WINDOW, (shard + 1) * 100)).all()
    assert (mix.plan(0, index, np.zeros_like(index), 100, 300, (8, 8)).partner == -1).all()  # view 0: never mixed


def test_mixed_cross_entropy_and_the_losses_that_refuse_it():
    from pipeline.losses import build_loss
    from pipeline.losses.base import mixed_cross_entropy

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    y, y2 = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 1, 3, 0, 2, 4])
    lam = torch.tensor([1.0, 0.3, 0.5, 0.9, 0.0, 0.7], dtype=torch.float64)
    logp = torch.log_softmax(s, 1)
    want = -(lam * logp[torch.arange(6), y] + (1 - lam) * logp[torch.arange(6), y2]).mean()
    torch.testing.assert_close(mixed_cross_entropy(s, y, (y2, lam)), want, rtol=1e-12, atol=0)
    kd = build_loss("kd")
    out = kd(s, t, y, mix=(y2, lam))
    torch.testing.assert_close(out["ce"], want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="reads the hard target"):
        build_loss("dkd")(s, t, y, epoch=1.0, mix=(y2, lam))
    assert kd.mixes and not build_loss("dkd").mixes


def test_trivial_augment_ops_are_torchvisions():
    """Every op of the space at several magnitudes equals torchvision's TrivialAugmentWide applying that op; the
    draw covers the space like torchvision's (every op, both signs)."""
    from torchvision.transforms import InterpolationMode

    from pipeline.data.views import _TA_SPACE, apply_photometric, trivial_augment_op

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (3, 24, 20), dtype=np.uint8))
    tv = v2.TrivialAugmentWide()
    for name, (bins, signed) in _TA_SPACE.items():
        for magnitude in [0.0] if bins is None else [bins[3], bins[17], -bins[30] if signed else bins[30]]:
            want = tv._apply_image_or_video_transform(x, name, magnitude, InterpolationMode.NEAREST, tv._fill)
            assert torch.equal(apply_photometric(x, name, magnitude), want), (name, magnitude)
    draws = [trivial_augment_op(int(k)) for k in np.random.default_rng(1).integers(0, 2**62, 3000)]
    assert {n for n, _ in draws} == set(_TA_SPACE)
    assert any(m < 0 for n, m in draws if n == "Rotate") and any(m > 0 for n, m in draws if n == "Rotate")


def test_a_damaged_jpeg_in_a_shard_stops_the_loader_naming_shard_and_sample(tmp_path):
    """A JPEG member whose bytes were damaged after prepare is a ShardError naming the shard and key: never pixels."""
    from pipeline.data.shards import ShardError

    good = _jpeg(40, 30, seed=1)
    bad = good[: len(good) // 2]  # truncated: libjpeg-turbo refuses it
    items = [(Encoded(good, "jpg", decode_jpeg(good)), 0), (Encoded(bad, "jpg", decode_jpeg(good)), 1)]
    m = write_dataset(tmp_path / "damaged", "damaged", {"train": items, "test": items[:1]}, ["a", "b"], shard_size=8)
    ds = DistillDataset(m, "train", shuffle=False, recipe=ResizedCropFlip(size=16))
    with pytest.raises(ShardError, match=r"train-000000\.tar: cannot decode sample 00000001"):
        list(make_loader(ds, 4, workers=0))
