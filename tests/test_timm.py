"""timm architectures, `preprocess: model`, and teachers brought as safetensors files (timm's naming or kdcache's).

The tiny `test_*` models timm ships for its own unit tests (160x160 inputs, a few 100k parameters) keep this fast.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402

from pipeline.config import ConfigError, TeacherSpec, TrainTeacherConfig  # noqa: E402
from pipeline.models import (  # noqa: E402
    CheckpointError,
    Preprocess,
    build_for,
    build_model,
    canonical_arch,
    import_model,
    load_model,
    save_model,
)


@dataclass
class Spec:
    """What building a model for a data set needs (a manifest is one)."""

    num_classes: int = 4
    image_shape: tuple[int, int, int] = (32, 32, 3)
    mean: tuple[float, ...] = (0.4, 0.5, 0.6)
    std: tuple[float, ...] = (0.2, 0.25, 0.3)
    dataset: str = "spec"


GRAY = Spec(image_shape=(28, 28, 1), mean=(0.3,), std=(0.35,))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any network connection fails the test: building a timm model must never fetch weights."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_timm_models_are_built_for_the_data_set(offline: None) -> None:
    assert canonical_arch(" TIMM:Test_ResNet ") == "timm:test_resnet"
    assert canonical_arch("timm:test_resnet.r160_in1k") == "timm:test_resnet.r160_in1k"
    net = build_model("timm:test_resnet", num_classes=7, in_channels=1)
    assert net.num_classes == 7 and net.conv1[0].in_channels == 1  # timm sized it: num_classes, in_chans
    with torch.no_grad():
        assert net.eval()(torch.rand(2, 1, 28, 28)).shape == (2, 7)
    model = build_for("timm:test_resnet", GRAY)  # preprocess: data, as every zoo model
    assert model.preprocess == Preprocess("data", (0.3,), (0.35,))
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 1, 28, 28)).shape == (2, 4)


def test_unknown_timm_names_list_close_matches() -> None:
    with pytest.raises(
        ValueError, match=r"unknown timm model 'resnet_18' in 'timm:resnet_18'; close matches: .*'resnet18'"
    ):
        canonical_arch("timm:resnet_18")
    with pytest.raises(ValueError, match=r"no pretrained tag 'a1_in2k'.*'a1_in1k'"):
        canonical_arch("timm:resnet18.a1_in2k")
    with pytest.raises(ValueError, match=r"timm:<name>"):  # the zoo's own error names the timm prefix
        canonical_arch("resnet_18")


def test_preprocess_model_resizes_inside_the_model_as_pil_would(offline: None) -> None:
    """preprocess: model = the pretrained_cfg's input size, interpolation and mean/std, applied by the wrapper to the
    data set's [0, 1] images; checked against PIL's resize of the uint8 image (an independent implementation)."""
    model = build_for("timm:test_resnet", Spec(), "model").eval()
    p = model.preprocess
    assert p.to_dict() == {
        "mode": "model",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "input_size": [160, 160],
        "interpolation": "bilinear",
    }
    seen = []
    model.net.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        assert model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255).shape == (1, 4)
    pil = np.asarray(Image.fromarray(image).resize((160, 160), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    expected = (torch.from_numpy(pil).permute(2, 0, 1)[None] - 0.5) / 0.5
    assert seen[0].shape == (1, 3, 160, 160)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=2 * (2 / 255))  # PIL rounds to uint8; /std 0.5
    # Grayscale data: timm sums a pretrained RGB stem over colours, so the gray image gets the colours' mean stats.
    gray = build_for("timm:test_efficientnet", GRAY, "model").preprocess
    assert gray.mean == pytest.approx(((0.485 + 0.456 + 0.406) / 3,)) and gray.interpolation == "bicubic"
    assert gray.std == pytest.approx(((0.229 + 0.224 + 0.225) / 3,)) and gray.input_size == (160, 160)


def test_preprocess_errors_name_the_options() -> None:
    with pytest.raises(ValueError, match=r"preprocess must be one of \['data', 'model'\]"):
        build_for("timm:test_resnet", Spec(), "imagenet")
    with pytest.raises(ValueError, match=r"'cnn_tiny' is not a timm model.*preprocess: data"):
        build_for("cnn_tiny", Spec(), "model")
    # A ViT's position embeddings fix its input size: at 32x32 it needs the resize of preprocess: model.
    with pytest.raises(ValueError, match=r"takes only 160x160 inputs .* 32x32 images: set preprocess: model"):
        build_for("timm:test_vit", Spec(), "data")
    with torch.no_grad():
        assert build_for("timm:test_vit", Spec(), "model").eval()(torch.rand(1, 3, 32, 32)).shape == (1, 4)


def test_timm_safetensors_state_dict_is_imported_in_timm_naming(tmp_path: Path, offline: None) -> None:
    """A user's `model.safetensors` as timm saves it (its own key names) becomes a teacher, saved and reloaded by
    kdcache with its preprocessing, giving the original network's logits on the preprocessed images."""
    torch.manual_seed(0)
    original = timm.create_model("test_resnet", num_classes=4, in_chans=3).eval()
    weights = tmp_path / "model.safetensors"
    save_file(original.state_dict(), weights)
    teacher = import_model(weights, "timm:test_resnet.r160_in1k", Spec(), "model").eval()
    x = torch.rand(3, 3, 32, 32)
    resized = nnf.interpolate(x, size=(160, 160), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        expected = original((resized - 0.5) / 0.5)
        torch.testing.assert_close(teacher(x), expected)
    saved = save_model(tmp_path / "teacher.safetensors", teacher, "timm:test_resnet.r160_in1k", {"name": "t"})
    reloaded, meta = load_model(saved, data=Spec())
    assert meta["arch"] == "timm:test_resnet.r160_in1k" and meta["preprocess"]["input_size"] == [160, 160]
    assert reloaded.preprocess == teacher.preprocess
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected)
    # kdcache's own checkpoint is imported too, with the preprocessing it was trained with (and only that one).
    assert import_model(saved, "timm:test_resnet.r160_in1k", Spec(), "model").preprocess == teacher.preprocess
    with pytest.raises(CheckpointError, match=r"trained with preprocess: model, but preprocess: data .* set .* model"):
        import_model(saved, "timm:test_resnet.r160_in1k", Spec(), "data")


def test_checkpoint_for_other_classes_or_channels_names_file_keys_and_fix(tmp_path: Path) -> None:
    imagenet = tmp_path / "imagenet.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=1000).state_dict(), imagenet)
    with pytest.raises(CheckpointError) as info:
        import_model(imagenet, "timm:test_resnet", Spec(), "model")
    msg = str(info.value)
    assert str(imagenet) in msg and "fc.weight: file (1000, 96) vs model (4, 96)" in msg
    assert "1000 outputs but the data set has 4 classes" in msg and "fine-tune" in msg
    rgb = tmp_path / "rgb.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=4).state_dict(), rgb)
    with pytest.raises(CheckpointError, match=r"takes 3-channel images .* 1 channel.*prepare.options.mode: RGB"):
        import_model(rgb, "timm:test_resnet", GRAY, "data")
    sd = timm.create_model("test_resnet", num_classes=4).state_dict()
    sd["head.weight"] = sd.pop("fc.weight")
    renamed = tmp_path / "renamed.safetensors"
    save_file(sd, renamed)
    with pytest.raises(CheckpointError, match=r"renamed.safetensors.*missing keys \['fc.weight'\].*'head.weight'"):
        import_model(renamed, "timm:test_resnet", Spec(), "data")


def test_pretrained_without_a_file_says_where_to_put_it(tmp_path: Path, tiny_manifest) -> None:
    from pipeline.training.teacher import train_teacher

    spec = TeacherSpec(arch="timm:resnet18.a1_in1k", pretrained=True)
    with pytest.raises(ConfigError) as info:
        train_teacher(tiny_manifest, "r18", spec, TrainTeacherConfig(), tmp_path / "teachers")
    msg = str(info.value)
    assert "never downloads" in msg and "'timm/resnet18.a1_in1k'" in msg and "model.safetensors" in msg
    assert "weights/r18.safetensors" in msg and "teachers.r18.checkpoint: weights/r18.safetensors" in msg
    assert not (tmp_path / "teachers").exists()


def test_store_fingerprint_records_the_preprocessing(tmp_path: Path) -> None:
    """The same weights behind another preprocessing make other logits: the store's teacher identity says which."""
    from pipeline.cache.store import LogitStore
    from pipeline.cache.teach import teach_store
    from pipeline.config import TeachConfig
    from pipeline.data.shards import write_dataset
    from tests.conftest import synthetic_splits

    splits, classes = synthetic_splits(n_train=16, n_test=8, channels=3)
    m = write_dataset(tmp_path / "shards", "tiny", splits, classes, shard_size=8)
    cfg = TeachConfig(views=1, batch_size=8, chunk_rows=8, threads=1)
    torch.manual_seed(0)
    teachers = {mode: build_for("timm:test_resnet", m, mode).eval() for mode in ("data", "model")}
    teachers["model"].net.load_state_dict(teachers["data"].net.state_dict())  # same weights, other inputs
    stores = {}
    for mode, model in teachers.items():
        ckpt = save_model(tmp_path / f"{mode}.safetensors", model, "timm:test_resnet")
        stores[mode] = LogitStore(teach_store(m, ckpt, tmp_path / f"{mode}.zarr", cfg, "t"), "test")
    assert stores["model"].teacher["preprocess"] == teachers["model"].preprocess.to_dict()
    assert stores["model"].teacher["preprocess"]["input_size"] == [160, 160]
    assert stores["data"].teacher["preprocess"] == teachers["data"].preprocess.to_dict()
    assert stores["data"].teacher["preprocess"]["input_size"] is None  # the data set's 16x16
    assert not np.allclose(stores["data"].read_all(), stores["model"].read_all())
