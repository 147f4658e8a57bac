"""`prepare.encode: keep`: an ImageFolder's JPEG/PNG files go into the shards as their own bytes; odd files are
converted, refused or skipped as torchvision's ImageFolder would meet them (README's table)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from pipeline.data.shards import iter_shard, load_manifest
from pipeline.errors import UserError
from stages import prepare


def _img(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 4), max(2, w // 4), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def _save(path: Path, im: Image.Image, fmt: str, **kw) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _folder(root: Path) -> dict[str, bytes]:
    """Every kind of file the README's table names; returns file name -> bytes of those that must be kept."""
    kept = {}
    kept["plain.jpg"] = _save(root / "train/a/plain.jpg", _img(30, 40, 0), "JPEG", quality=90)
    kept["prog.jpg"] = _save(root / "train/a/prog.jpg", _img(48, 36, 1), "JPEG", progressive=True)
    _save(root / "train/a/cmyk.jpg", _img(20, 20, 2).convert("CMYK"), "JPEG")
    _save(root / "train/b/gray.jpg", _img(25, 35, 3).convert("L"), "JPEG")
    _save(root / "train/b/pal.png", _img(16, 16, 4).convert("P"), "PNG")
    deep = (np.arange(12 * 10).reshape(12, 10) * 500).astype(np.uint16)  # a 16-bit gray PNG (mode I;16)
    _save(root / "train/b/deep.png", Image.fromarray(deep), "PNG")
    kept["rgb.png"] = _save(root / "train/b/rgb.png", _img(17, 19, 5), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    kept["exif.jpg"] = _save(root / "train/b/exif.jpg", _img(20, 40, 6), "JPEG", exif=exif.tobytes())
    kept["tiny.jpg"] = _save(root / "train/b/tiny.jpg", _img(5, 4, 7), "JPEG")
    (root / "train/a/README.txt").write_text("not an image")
    _save(root / "test/a/x.jpg", _img(30, 30, 8), "JPEG")
    _save(root / "test/b/y.jpg", _img(31, 29, 9), "JPEG")
    return kept


def _prepare(tmp_path: Path, root: Path, out: str, **extra) -> Path:
    params = {"prepare": {"name": "odd", "source": "imagefolder", "root": str(root), "shard_size": 4, "val": 0,
                          "shuffle_seed": None, **extra}}  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prepare.main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / out)])
    return tmp_path / out


def _members(m) -> dict[str, tuple[str, bytes]]:
    """Sample index -> (member type, bytes) of the train split, read back from the shards."""
    out = {}
    for shard in m.split("train").shards:
        for i, data, _ in iter_shard(m.root / shard.path, decode=False):
            out[i] = data
    return out


def test_keep_stores_the_files_and_converts_the_rest(tmp_path):
    root = tmp_path / "odd"
    kept = _folder(root)
    m = load_manifest(_prepare(tmp_path, root, "shards"))
    names = sorted(p.name for p in (root / "train").rglob("*") if p.suffix in (".jpg", ".png"))
    # torchvision's order: class a then b, sorted paths within a class
    order = ["cmyk.jpg", "plain.jpg", "prog.jpg", "deep.png", "exif.jpg", "gray.jpg", "pal.png", "rgb.png", "tiny.jpg"]
    assert sorted(order) == names and m.split("train").n == 9 and m.image_shape == (None, None, 3)
    members = _members(m)
    for i, name in enumerate(order):
        data = bytes(members[i])
        if name in kept:
            assert data == kept[name], name  # the member is the file, byte for byte
        else:
            assert data[:8] == b"\x89PNG\r\n\x1a\n", name  # converted to RGB and stored losslessly
    sizes = m.sizes("train")
    assert tuple(sizes[order.index("exif.jpg")]) == (20, 40)  # EXIF orientation not applied (as torchvision)
    assert tuple(sizes[order.index("tiny.jpg")]) == (5, 4)
    cmyk = [img for i, img, _ in iter_shard(m.root / m.split("train").shards[0].path) if i == 0][0]
    assert cmyk.shape == (20, 20, 3)  # CMYK decoded by Pillow to RGB
    png = load_manifest(_prepare(tmp_path, root, "png", encode="png"))
    assert all(bytes(d)[:4] == b"\x89PNG" for d in _members(png).values())


def test_truncated_and_bomb_files_are_one_line_or_skipped(tmp_path, monkeypatch):
    root = tmp_path / "odd"
    _folder(root)
    good = (root / "train/a/plain.jpg").read_bytes()
    (root / "train/a/broken.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match=r"cannot decode image .*broken\.jpg.*on_corrupt='skip'"):
        _prepare(tmp_path, root, "shards")
    m = load_manifest(_prepare(tmp_path, root, "skipped", options={"on_corrupt": "skip"}))
    assert m.split("train").n == 9  # the truncated file dropped, the rest kept
    (root / "train/a/broken.jpg").unlink()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 40x30 = 1200 px > 2 x 200: a "bomb" here
    with pytest.raises(UserError, match=r"cannot decode image .*DecompressionBombError"):
        _prepare(tmp_path, root, "bomb")


def _shapes_folder(root: Path, n_train: int, n_test: int) -> None:
    """A learnable 3-class ImageFolder of JPEGs of many sizes: a red, green or blue disc on a grey ground."""
    rng = np.random.default_rng(0)
    colours = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 50, 40)}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            name = list(colours)[i % 3]
            h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
            im = Image.new("RGB", (w, h), (128, 128, 128))
            r = min(h, w) // 3
            cy, cx = int(rng.integers(r, h - r + 1)), int(rng.integers(r, w - r + 1))
            ImageDraw.Draw(im).ellipse((cx - r, cy - r, cx + r, cy + r), fill=colours[name])
            _save(root / split / name / f"{i:04d}.jpg", im, "JPEG", quality=90)


@pytest.mark.slow
def test_every_stage_on_jpegs_of_many_sizes_with_rrc_flip_and_mixing(tmp_path, monkeypatch):
    """prepare (JPEG bytes kept) -> train_teacher / teach (rrc_flip + CutMix/Mixup + TrivialAugment) -> distill ->
    evaluate, on a tiny ImageFolder of mixed sizes; a loss that reads the hard target refuses the mixing store."""
    from pipeline.config import ConfigError
    from pipeline.records import read_record
    from stages import corrupt, distill, evaluate, report, teach, train_teacher
    from tests.conftest import make_project, tiny_params

    _shapes_folder(tmp_path / "shapes", 150, 45)
    recipe = {"recipe": "rrc_flip", "size": 24, "scale": [0.35, 1.0], "crop_pct": 1.0, "flip": True}
    params = tiny_params(
        prepare={
            "name": "shapes",
            "source": "imagefolder",
            "root": str(tmp_path / "shapes"),
            "options": {},
            "shard_size": 32,
            "encode": "keep",
        },  # fmt: skip
        teachers={"small": {"arch": "cnn_tiny", "epochs": 2, "lr": 0.05, "batch_size": 32}},
        distill={"losses": ["kd", "dkd"]},
    )
    params["train_teacher"]["augment"] = {**recipe, "cutmix_alpha": 1.0}
    params["teach"]["augment"] = {**recipe, "mixup_alpha": 0.8, "photometric": "trivial_augment"}
    make_project(tmp_path / "project", params)
    monkeypatch.chdir(tmp_path / "project")
    prepare.main([])
    m = load_manifest("data/shards/shapes")
    assert m.image_shape == (None, None, 3) and m.sizes("train").shape == (m.split("train").n, 2)
    train_teacher.main(["--name", "small"])
    assert read_record("metrics/teachers/details/small.json", "teacher")["val_accuracy"] > 0.5  # 3 classes
    teach.main(["--name", "small"])
    distill.main(["--teacher", "small", "--loss", "kd"])
    corrupt.main([])  # corrupted copies need one image size: none made, evaluation measures no mCA
    assert not Path("data/corrupt/shapes/meta.json").exists()
    evaluate.main(["--student", "small-kd-full-0"])
    record = read_record("metrics/details/small-kd-full-0.json", "student")
    assert 0 <= record["accuracy"] <= 1 and record["teacher_calls"] == 2 * m.split("train").n
    assert record.get("mca") is None and not record.get("robustness")  # no corrupted copies: no mCA
    report.main([])
    assert "| small | kd |" in Path("reports/report.md").read_text()
    with pytest.raises(ConfigError, match="reads the hard target.*mixed views"):
        distill.main(["--teacher", "small", "--loss", "dkd"])
