"""The student data path: epoch coverage for any worker/rank count, determinism, block joins, bad shards."""

from __future__ import annotations

import collections
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from pipeline.cache.budget import BudgetSpec
from pipeline.cache.store import LogitStore, StoreError
from pipeline.cache.teach import build_spec, run_teach
from pipeline.data.shards import Manifest, ShardError, sample_key, write_dataset
from pipeline.data.views import PadCropFlip
from pipeline.training.dataset import DistillDataset
from pipeline.training.transport import make_loader
from tests.conftest import synthetic_splits

VIEWS = 2


def fake_teacher(imgs: np.ndarray) -> np.ndarray:
    """A deterministic 'teacher' (no torch): logits = the first 4 pixels, as float."""
    return imgs.reshape(len(imgs), -1)[:, :4].astype(np.float32) / 16.0  # (n, 4)


def make_data(root: Path, n_train: int = 300, shard_size: int = 64) -> tuple[Manifest, Path]:
    """Shards (n_train rows: 5 shards of <= 64, the last one short) + a complete 2-view store."""
    splits, classes = synthetic_splits(n_train=n_train, n_test=64)
    m = write_dataset(root / "shards", "tiny", splits, classes, shard_size=shard_size)
    recipes = {"train": PadCropFlip(VIEWS, 3, 2, True), "test": PadCropFlip(1, 3, 2, True)}
    spec = build_spec(
        m,
        {"name": "fake", "arch": "fn", "weights_sha256": "0"},
        recipes,
        dtype="float16",
        topk=0,
        compressor="blosc-zstd",
        chunk_rows=shard_size,
        budget=BudgetSpec(),
    )
    store = root / "fake.zarr"
    run_teach(m, fake_teacher, store, spec, recipes, batch_size=1000)
    return m, store


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path]:
    """5 shards (not divisible by 2 workers or 2 ranks), read-only."""
    return make_data(tmp_path_factory.mktemp("odd"))


def epoch_indices(ds: DistillDataset, epoch: int, workers: int, batch_size: int = 16) -> tuple[list[int], int]:
    """The epoch's sample indices in stream order, and the number of batches."""
    ds.set_epoch(epoch)
    out: list[int] = []
    batches = 0
    for batch in make_loader(ds, batch_size, workers=workers):
        out += batch["index"].tolist()
        batches += 1
    return out, batches


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_every_index_exactly_once_per_epoch(odd, workers):
    m, store = odd
    ds = DistillDataset(m, "train", store, seed=5, shuffle_buffer=40)
    n = m.split("train").n
    assert len(m.split("train").shards) % 2 == 1  # shards do not divide by the worker count
    for epoch in (0, 1):
        idx, batches = epoch_indices(ds, epoch, workers)
        assert sorted(idx) == list(range(n))
        plan = ds.plan(16, workers)
        assert plan.samples == (n,) and plan.batches == (batches,)  # per-worker partial batches counted


@pytest.mark.parametrize("workers", [0, 2])
def test_budget_drop_yields_allowed_rows_once(odd, workers):
    m, store = odd
    n = m.split("train").n
    allowed = np.random.default_rng(0).random((n, VIEWS)) < 0.3  # (N, V): some rows have no view at all
    ds = DistillDataset(m, "train", store, seed=1, shuffle_buffer=40, allowed=allowed)
    ds.set_epoch(0)
    idx, views = [], []
    batches = 0
    for batch in make_loader(ds, 16, workers=workers):
        idx += batch["index"].tolist()
        views += batch["view"].tolist()
        batches += 1
    assert sorted(idx) == np.flatnonzero(allowed.any(1)).tolist()
    assert all(allowed[i, v] for i, v in zip(idx, views, strict=True))  # only views the teacher answered
    assert ds.num_samples() == len(idx) and ds.plan(16, workers).batches == (batches,)


def test_order_is_deterministic_per_seed_epoch_workers(odd):
    m, store = odd

    def order(seed: int, epoch: int, workers: int) -> list[int]:
        return epoch_indices(DistillDataset(m, "train", store, seed=seed, shuffle_buffer=40), epoch, workers)[0]

    a = order(0, 0, 2)
    assert a == order(0, 0, 2)  # same (seed, epoch, workers): same stream
    assert a != order(0, 1, 2)  # another epoch: another order
    assert a != order(1, 0, 2)  # another seed: another order
    assert order(0, 0, 0) == order(0, 0, 0)


def test_ranks_partition_the_epoch(odd, monkeypatch):
    """Two simulated DDP ranks (torchrun's env): disjoint, together every index once; plan == reality."""
    m, store = odd
    n = m.split("train").n
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = DistillDataset(m, "train", store, seed=2, shuffle_buffer=40)
        idx, batches = epoch_indices(ds, 3, workers=1)
        plan = ds.plan(16, 1)
        assert plan.samples[rank] == len(idx) and plan.batches[rank] == batches
        seen.append(idx)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(n))
    assert len(seen[0]) != len(seen[1])  # 5 shards over 2 ranks: unequal (the train loop pads steps)
    # An unshuffled evaluation set is not split: every rank sees the whole split.
    monkeypatch.setenv("RANK", "1")
    test = DistillDataset(m, "test", shuffle=False)
    assert sorted(epoch_indices(test, 0, workers=0)[0]) == list(range(m.split("test").n))


def test_logits_join_is_one_block_read_per_shard(odd, monkeypatch):
    m, store = odd
    calls: list[tuple[int, int]] = []
    orig = LogitStore.read_block

    def counting(self, start, stop, **kw):
        calls.append((start, stop))
        return orig(self, start, stop, **kw)

    monkeypatch.setattr(LogitStore, "read_block", counting)
    ds = DistillDataset(m, "train", store, seed=0, shuffle_buffer=40)
    ds.set_epoch(0)
    rows = {}
    for batch in make_loader(ds, 32, workers=0):
        for i, v, z in zip(batch["index"].tolist(), batch["view"].tolist(), batch["logits"], strict=True):
            rows[(i, v)] = z
        assert batch["logits"].dtype == torch.float32  # read as stored float16, converted per batch
    assert sorted(calls) == [(s.start, s.stop) for s in m.split("train").shards]
    full = LogitStore(store, "train").read_all()  # (N, V, C)
    for (i, v), z in rows.items():
        assert torch.equal(z, torch.from_numpy(full[i, v]))


# ---------------------------------------------------------------------------------------------
# bad input


def _rewrite_shard(path: Path, keys: list[str], samples: dict[str, dict]) -> None:
    """Write `path` again with the samples in `keys` order (webdataset's own writer)."""
    buf = io.BytesIO()
    w = wds.TarWriter(buf)
    for k in keys:
        w.write({"__key__": k, **samples[k]})
    w.close()
    path.write_bytes(buf.getvalue())


def _read_shard(path: Path) -> tuple[list[str], dict[str, dict]]:
    keys, samples = [], {}
    with tarfile.open(path) as tf:
        for member in tf.getmembers():
            key, ext = member.name.split(".", 1)
            if key not in samples:
                keys.append(key)
                samples[key] = {}
            samples[key][ext] = tf.extractfile(member).read()
    return keys, samples


def _drain(ds: DistillDataset, workers: int) -> None:
    ds.set_epoch(0)
    for _ in make_loader(ds, 16, workers=workers):
        pass


@pytest.fixture
def small(tmp_path: Path) -> tuple[Manifest, Path]:
    """A fresh 2-shard data set + store the test may damage."""
    return make_data(tmp_path, n_train=128)


def test_out_of_order_keys_name_shard_and_key(small):
    m, store = small
    shard = m.root / m.split("train").shards[1].path
    keys, samples = _read_shard(shard)
    keys[3], keys[4] = keys[4], keys[3]
    _rewrite_shard(shard, keys, samples)
    ds = DistillDataset(m, "train", store, shuffle=False)
    with pytest.raises(ShardError, match=rf"{shard}: sample key '{keys[3]}' where row {int(keys[4])} was expected"):
        _drain(ds, 0)


def test_foreign_key_names_shard_and_key(small):
    m, store = small
    shard = m.root / m.split("train").shards[0].path
    keys, samples = _read_shard(shard)
    samples["cat"] = samples.pop(keys[0])
    _rewrite_shard(shard, ["cat", *keys[1:]], samples)
    with pytest.raises(ShardError, match=rf"{shard}: sample key 'cat' where row 0 was expected"):
        _drain(DistillDataset(m, "train", store, shuffle=False), 0)


@pytest.mark.parametrize(("workers", "cuts"), [(0, [0.3, 0.5, 0.77, 0.9]), (1, [0.5])])
def test_truncated_shard_names_shard_and_last_good_sample(small, workers, cuts):
    """Cuts inside a member (tarfile read error) and inside a sample (incomplete sample) alike."""
    m, store = small
    shard = m.root / m.split("train").shards[1].path
    data = shard.read_bytes()
    for frac in cuts:
        cut = data[: int(len(data) * frac) + 100]
        shard.write_bytes(cut)
        keys = _complete_keys(cut)
        ds = DistillDataset(m, "train", store, seed=0, shuffle_buffer=8)
        with pytest.raises(ShardError, match=rf"corrupt or truncated shard {shard} after sample '{keys[-1]}'"):
            _drain(ds, workers)


def _complete_keys(data: bytes) -> list[str]:
    """Keys of the complete samples (png + cls both present) in a truncated tar's bytes."""
    files: dict[str, set[str]] = collections.defaultdict(set)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tf:
            for member in tf:
                tf.extractfile(member).read()
                key, ext = member.name.split(".", 1)
                files[key].add(ext)
    except tarfile.ReadError:
        pass
    return [k for k, exts in files.items() if exts >= {"png", "cls"}]


def test_short_shard_cut_between_samples_is_an_error(small):
    m, store = small
    shard = m.root / m.split("train").shards[0].path
    keys, samples = _read_shard(shard)
    _rewrite_shard(shard, keys[:-5], samples)  # a valid tar, 5 samples short
    with pytest.raises(ShardError, match=rf"truncated shard {shard} after sample '{keys[-6]}': the shard ends there"):
        _drain(DistillDataset(m, "train", store, shuffle=False), 0)


def test_garbage_shard_is_named(small):
    m, store = small
    shard = m.root / m.split("train").shards[0].path
    shard.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ShardError, match=rf"shard {shard}"):
        _drain(DistillDataset(m, "train", store, shuffle=False), 0)


def test_missing_shard_is_named(small):
    m, store = small
    shard = m.root / m.split("train").shards[1].path
    shard.unlink()
    with pytest.raises(ShardError, match=rf"shard {shard} is listed in the manifest but missing"):
        _drain(DistillDataset(m, "train", store, shuffle=False), 0)


def test_store_of_another_data_set_is_refused(small, odd):
    m_small, _ = small
    _, store_odd = odd
    with pytest.raises(StoreError, match=r"does not match shards .*N 300 != 128"):
        DistillDataset(m_small, "train", store_odd)


def test_sample_keys_are_rows():
    assert sample_key(7) == "00000007" and int(sample_key(123)) == 123


# ---------------------------------------------------------------------------------------------
# fast paths == reference paths


def test_fast_tar_reader_equals_webdataset(odd, tmp_path):
    from webdataset.tariterators import tarfile_samples

    from pipeline.data.shards import tar_samples

    m, _ = odd
    url = str(m.root / m.split("train").shards[4].path)
    want = list(tarfile_samples([{"url": url}]))
    assert list(tar_samples(url)) == want
    # A member name too long for ustar makes tarfile write a PAX header: handed to webdataset's reader.
    keys, samples = _read_shard(Path(url))
    long = "x" * 120
    samples[long] = samples.pop(keys[-1])
    odd_tar = tmp_path / "pax.tar"
    _rewrite_shard(odd_tar, [*keys[:-1], long], samples)
    assert list(tar_samples(str(odd_tar))) == list(tarfile_samples([{"url": str(odd_tar)}]))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_fast_png_decode_equals_pil(channels):
    from PIL import Image

    from pipeline.data.tario import decode_png, decode_png_fast, encode_png

    rng = np.random.default_rng(channels)
    for h, w in [(28, 28), (32, 32), (7, 13)]:
        smooth = np.cumsum(rng.integers(0, 9, (h, w, channels)), axis=1).astype(np.uint8)  # exercises all filters
        for img in (smooth, rng.integers(0, 256, (h, w, channels), dtype=np.uint8)):
            data = encode_png(img)
            assert np.array_equal(decode_png_fast(data), decode_png(data))
            assert np.array_equal(decode_png_fast(data), img)
    # Formats outside the fast path fall back to PIL: palette and 16-bit images.
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (5, 6), dtype=np.uint8)).convert("P").save(buf, format="PNG")
    assert np.array_equal(decode_png_fast(buf.getvalue()), decode_png(buf.getvalue()))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 60000, (5, 6)).astype(np.uint16)).save(buf, format="PNG")
    assert np.array_equal(decode_png_fast(buf.getvalue()), decode_png(buf.getvalue()))


def test_batch_crop_flip_equals_per_sample():
    from pipeline.data.views import crop_flip, crop_flip_batch

    rng = np.random.default_rng(0)
    for pad, (h, w, c) in [(2, (16, 16, 1)), (4, (32, 32, 3)), (3, (5, 9, 2))]:
        imgs = rng.integers(0, 256, (64, h, w, c), dtype=np.uint8)
        sy, sx = rng.integers(-pad, pad + 1, 64), rng.integers(-pad, pad + 1, 64)
        flip = rng.random(64) < 0.5
        want = np.stack([crop_flip(imgs[k], int(sy[k]), int(sx[k]), bool(flip[k])) for k in range(64)])
        assert np.array_equal(crop_flip_batch(imgs, sy, sx, flip, pad), want)


def test_loader_batches_equal_collated_samples(odd):
    """make_loader's numpy-collated batches == default collation of the per-sample stream."""
    from torch.utils.data import default_collate

    m, store = odd
    ds = DistillDataset(m, "train", store, seed=9, shuffle_buffer=40)
    ds.set_epoch(2)
    samples = list(ds)
    batches = list(make_loader(ds, 16, workers=0))
    assert len(batches) == -(-len(samples) // 16)
    for k, got in enumerate(batches):
        want = default_collate(samples[16 * k : 16 * (k + 1)])
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            assert torch.equal(got[key], want[key]), key


def test_worker_batches_arrive_as_the_same_tensors(odd):
    """One worker streams what the main process would (numpy over the pipe, tensors on arrival)."""
    m, store = odd
    ds = DistillDataset(m, "train", store, seed=9, shuffle_buffer=40)
    ds.set_epoch(1)
    here = list(make_loader(ds, 16, workers=0))
    there = list(make_loader(ds, 16, workers=1))
    assert len(here) == len(there)
    for a, b in zip(here, there, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert isinstance(b[key], torch.Tensor) and b[key].dtype == a[key].dtype and torch.equal(a[key], b[key])
