"""CIFAR-C-style corruptions: deterministic, shape-preserving, stronger with severity; the stored set round-trips."""

from __future__ import annotations

import colorsys
import json

import numpy as np
import pytest

from pipeline.config import ConfigError, from_dict
from pipeline.data.corruptions import (
    CORRUPTIONS,
    PARAMS,
    CorruptConfig,
    choose_rows,
    corrupt,
    gaussian_kernel,
    load_corrupted,
    plasma_fractal,
    write_corrupted,
)
from pipeline.data.shards import write_dataset
from pipeline.data.sources import load_split
from stages import corrupt as corrupt_stage
from tests.conftest import make_project, tiny_params

RANDOM = ("gaussian_noise", "shot_noise", "haze")  # the corruptions that draw random numbers


def images(n: int = 24, size: int = 28, channels: int = 1) -> np.ndarray:
    return load_split("synthetic", None, "test", n=n, size=size, channels=channels, num_classes=4, seed=0).images


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_deterministic_per_seed(name):
    x = images(8, 16, 3)
    a = corrupt(x, name, 3, seed=7)
    assert a.tobytes() == corrupt(x, name, 3, seed=7).tobytes()
    if name in RANDOM:
        assert a.tobytes() != corrupt(x, name, 3, seed=8).tobytes()
    else:  # deterministic transforms ignore the seed
        assert a.tobytes() == corrupt(x, name, 3, seed=8).tobytes()


@pytest.mark.parametrize("name", RANDOM)
def test_noise_depends_on_the_row_not_the_batch(name):
    """Image i's noise is seeded by (seed, corruption, severity, i): a subset, in any order, gets the same pixels."""
    x = images(10, 16, 1)
    full = corrupt(x, name, 2, seed=0, index=np.arange(10))
    rows = np.array([7, 2, 5])
    np.testing.assert_array_equal(corrupt(x[rows], name, 2, seed=0, index=rows), full[rows])
    assert not np.array_equal(full[0], corrupt(x[:1], name, 2, seed=0, index=[1])[0])  # another row, other noise


@pytest.mark.parametrize(("size", "channels"), [(28, 1), (32, 3)])
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_damage_grows_with_severity(name, size, channels):
    """Mean absolute pixel change strictly increases from severity 1 to 5 (Fashion-MNIST- and CIFAR-shaped images)."""
    x = images(24, size, channels)
    diffs = [np.abs(corrupt(x, name, s).astype(np.int16) - x).mean() for s in range(1, 6)]
    assert diffs[0] > 0.5, diffs  # severity 1 already changes the images
    assert all(b > a for a, b in zip(diffs, diffs[1:], strict=False)), (name, np.round(diffs, 2))


@pytest.mark.parametrize("shape", [(3, 7, 9, 1), (2, 20, 24, 3), (1, 5, 5, 3)])
def test_any_size_and_channels(shape):
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for name in CORRUPTIONS:
        y = corrupt(x, name, 5)
        assert y.shape == x.shape and y.dtype == np.uint8, name


def test_formulas_on_simple_images():
    grey = np.full((1, 4, 4, 1), 100, np.uint8)
    # blur and contrast leave a constant image alone; brightness adds 255 * c; pixelate keeps a constant
    for name in ("gaussian_blur", "contrast", "pixelate"):
        np.testing.assert_array_equal(corrupt(grey, name, 5), grey)
    np.testing.assert_array_equal(corrupt(grey, "brightness", 5), np.full_like(grey, round(100 + 255 * 0.3)))
    ramp = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1) * 16
    c = PARAMS["contrast"][1]
    want = np.rint(np.clip((ramp / 255 - ramp.mean() / 255) * c + ramp.mean() / 255, 0, 1) * 255)
    np.testing.assert_array_equal(corrupt(ramp, "contrast", 2), want)
    k = gaussian_kernel(1.0)
    assert k.sum() == pytest.approx(1.0) and len(k) == 9 and k[4] == k.max()  # radius 4 sigma
    noisy = corrupt(np.full((4, 16, 16, 3), 128, np.uint8), "gaussian_noise", 5)
    assert (noisy.astype(float) / 255 - 128 / 255).std() == pytest.approx(0.10, rel=0.1)  # sigma = c


def test_brightness_matches_hsv_round_trip():
    """Brightness = HSV value + c (Hendrycks & Dietterich), checked pixel by pixel against the stdlib colorsys."""
    x = np.random.default_rng(3).integers(0, 256, (1, 6, 6, 3), dtype=np.uint8)
    x[0, 0, 0] = 0  # a black pixel: hue/saturation undefined, becomes grey
    for sev in (1, 5):
        c = PARAMS["brightness"][sev - 1]
        want = np.empty(x.shape)
        for idx in np.ndindex(x.shape[1:3]):
            h, s, v = colorsys.rgb_to_hsv(*(x[(0, *idx)] / 255.0))
            want[(0, *idx)] = colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))
        got = corrupt(x, "brightness", sev).astype(float)
        np.testing.assert_allclose(got, want * 255, atol=0.5 + 1e-9)  # equal up to uint8 rounding


def test_plasma_fractal():
    f = plasma_fractal(32, 2.0, np.random.default_rng(0))
    assert f.shape == (32, 32) and f.min() == 0.0 and f.max() == 1.0
    with pytest.raises(ValueError, match="power of two"):
        plasma_fractal(28, 2.0, np.random.default_rng(0))


def test_bad_names_list_the_options():
    with pytest.raises(ValueError, match=r"unknown corruption 'fogg'.*'haze'"):
        corrupt(images(1), "fogg", 1)
    with pytest.raises(ValueError, match="severity must be one of"):
        corrupt(images(1), "jpeg", 6)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(CorruptConfig, {"corruption": ["jpeg"]}, "corrupt")


def test_stored_set_round_trip(tmp_path, tiny_manifest):
    cfg = CorruptConfig(corruptions=("jpeg", "haze"), severities=(1, 3), seed=5, limit=20)
    path = write_corrupted(tmp_path / "c", tiny_manifest, cfg, batch=7)
    assert not (tmp_path / "c.partial").exists()
    cs = load_corrupted(path, tiny_manifest)
    n_test = tiny_manifest.split("test").n
    assert cs.images.shape == (2, 2, 20, *tiny_manifest.image_shape) and cs.images.dtype == np.uint8
    np.testing.assert_array_equal(cs.index, choose_rows(n_test, 20, 5))
    assert np.all(np.diff(cs.index) > 0) and cs.corruptions == ["jpeg", "haze"] and cs.severities == [1, 3]
    np.testing.assert_array_equal(cs.labels, tiny_manifest.iter_labels("test")[cs.index])
    assert cs.meta["manifest_sha256"] == tiny_manifest.sha256 and cs.meta["dataset"] == "tiny"
    # a second run gives identical bytes; batching does not matter
    again = write_corrupted(tmp_path / "d", tiny_manifest, cfg, batch=64)
    assert (path / "images.npy").read_bytes() == (again / "images.npy").read_bytes()
    # joined with another data set: a clear error naming both
    splits = {"train": (images(8, 16), np.zeros(8, np.int64)), "test": (images(8, 16), np.zeros(8, np.int64))}
    other = write_dataset(tmp_path / "other", "other", splits, ["a", "b", "c", "d"], shard_size=4)
    with pytest.raises(ValueError, match=r"made from data set tiny.*evaluation uses other"):
        load_corrupted(path, other)
    with pytest.raises(FileNotFoundError, match="dvc repro corrupt"):
        load_corrupted(tmp_path / "missing")


def test_choose_rows():
    np.testing.assert_array_equal(choose_rows(10, None, 0), np.arange(10))
    np.testing.assert_array_equal(choose_rows(10, 50, 0), np.arange(10))
    r = choose_rows(1000, 100, 0)
    assert len(set(r.tolist())) == 100 and r.max() > 500  # spread over the split, not its head
    assert not np.array_equal(r, choose_rows(1000, 100, 1))


def test_stage_writes_the_data_set_folder(tmp_path, monkeypatch):
    from stages import prepare

    params = tiny_params(corrupt={"corruptions": ["contrast", "gaussian_noise"], "severities": [1, 2], "limit": 16})
    make_project(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    corrupt_stage.main([])
    meta = json.loads((tmp_path / "data/corrupt/tiny/meta.json").read_text())
    assert meta["corruptions"] == ["contrast", "gaussian_noise"] and meta["n"] == 16 and meta["limit"] == 16
    assert np.load(tmp_path / "data/corrupt/tiny/images.npy", mmap_mode="r").shape == (2, 2, 16, 16, 16, 1)
