"""Tests for pipeline.models: the zoo's parameter counts and shapes, the registry, checkpoints and their errors."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.models import (
    CheckpointError,
    build_model,
    canonical_arch,
    count_parameters,
    list_models,
    load_checkpoint,
    load_state_dict_checkpoint,
    save_checkpoint,
)

# Parameter counts (millions) quoted for the CIFAR-100 (100 classes, RGB) models in the KD literature's tables,
# i.e. for the CRD repository's definitions (Tian et al., ICLR 2020) that DKD and later papers reuse.
PUBLISHED_M: dict[str, float] = {
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet56": 0.86,
    "resnet110": 1.73,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.25,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "mobilenetv2": 0.81,
    "shufflenetv1": 0.95,
    "shufflenetv2": 1.36,
}
ZOO = sorted(set(list_models()) - {"cnn_tiny", "cnn_small"})


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Run this module's many tiny forwards on one intra-op thread.

    On a shared 2-core machine two OpenMP threads spin-wait on each other under load: measured here, the shape
    tests took ~25 s with 2 threads and ~1.5 s with 1.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def cifar100_model(arch: str) -> nn.Module:
    """Each (possibly large) model is built once per session and shared by the count and shape tests."""
    torch.manual_seed(0)
    return build_model(arch, num_classes=100, in_channels=3)


def test_registry_covers_the_literature_zoo() -> None:
    assert set(PUBLISHED_M) | {"resnet8", "resnet14", "resnet44"} <= set(list_models())


@pytest.mark.parametrize("arch", sorted(PUBLISHED_M))
def test_parameter_count_matches_literature(arch: str) -> None:
    ours = count_parameters(cifar100_model(arch))
    published = PUBLISHED_M[arch] * 1e6
    assert abs(ours - published) / published < 0.03, f"{arch}: {ours:,} vs published {published:,.0f}"
    # Tighter: agree to the published precision (two decimals in millions, allowing for rounding vs truncation).
    assert abs(ours - published) <= 0.01e6, f"{arch}: {ours:,} vs published {published:,.0f}"


@pytest.mark.parametrize("arch", list_models())
def test_forward_shapes_cifar_and_fashion_mnist(arch: str) -> None:
    with torch.no_grad():
        out = cifar100_model(arch).train()(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 100) and out.dtype == torch.float32 and torch.isfinite(out).all()
        # 28x28 grayscale (Fashion-MNIST): adaptive pooling makes the head independent of the resolution.
        assert build_model(arch, num_classes=10, in_channels=1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_vgg_extra_pool_for_large_inputs() -> None:
    # CRD pools once more before the last block for >= 64 px inputs (Tiny-ImageNet); the head must still fit.
    with torch.no_grad():
        assert cifar100_model("vgg8").eval()(torch.randn(1, 3, 64, 64)).shape == (1, 100)


def test_demo_models_sizes_and_gradients() -> None:
    tiny, small = build_model("cnn_tiny", 10, 1), build_model("cnn_small", 10, 1)
    assert 20_000 <= count_parameters(tiny) <= 60_000
    assert 100_000 <= count_parameters(small) <= 300_000
    assert any(isinstance(m, nn.BatchNorm2d) for m in tiny.modules())
    loss = nn.functional.cross_entropy(tiny(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tiny.parameters())


def test_count_parameters_trainable_only() -> None:
    model = build_model("cnn_tiny", 10, 1)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == total
    model.classifier.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - 64 * 10 - 10


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("wrn-40-2", "wrn_40_2"),
        ("WRN-16-2", "wrn_16_2"),
        ("ResNet8x4", "resnet8x4"),
        ("ShuffleV1", "shufflenetv1"),
        ("ShuffleV2", "shufflenetv2"),
        ("mobile_half", "mobilenetv2"),
        ("vgg13_bn", "vgg13"),
        ("tv:ResNet18", "tv:resnet18"),
    ],
)
def test_aliases_resolve(alias: str, canonical: str) -> None:
    assert canonical_arch(alias) == canonical


def test_hyphenated_alias_builds_the_same_network() -> None:
    assert count_parameters(build_model("wrn-40-1", 100)) == count_parameters(cifar100_model("wrn_40_1"))


def test_unknown_arch_lists_available_names() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'resnet9'") as info:
        build_model("resnet9", 10)
    assert "resnet8x4" in str(info.value) and "wrn_40_2" in str(info.value) and "tv:" in str(info.value)
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet19'.*resnet18"):
        build_model("tv:resnet19", 10)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_sizes_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet8", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="in_channels"):
        build_model("resnet8", 10, bad)  # type: ignore[arg-type]


def test_torchvision_model_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("build_model tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    model = build_model("tv:resnet18", num_classes=7, in_channels=1)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 7
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert build_model("tv:shufflenet_v2_x0_5", num_classes=5)(torch.randn(2, 3, 32, 32)).shape == (2, 5)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


def _trained_like(arch: str = "cnn_tiny", num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A model whose BN buffers differ from a fresh one, so the round trip must restore buffers too."""
    torch.manual_seed(1)
    model = build_model(arch, num_classes, in_channels)
    with torch.no_grad():
        model.train()(torch.randn(8, in_channels, 28, 28))
    return model.eval()


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _trained_like()
    path = save_checkpoint(
        tmp_path / "teachers" / "t.safetensors",
        model,
        "cnn-tiny",
        10,
        1,
        {"test_acc": 0.91, "epochs": 3, "params": {"lr": 0.1, "tags": ["a", None]}},
    )
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["t.safetensors"]  # no temp file left
    # A plain safetensors file: the weights under the network's own names, kdcache's metadata as one JSON string.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())
        header = json.loads(f.metadata()["kdcache"])
    assert header["arch"] == "cnn_tiny" and header["params"] == {"lr": 0.1, "tags": ["a", None]}

    loaded, meta = load_checkpoint(path, expected_arch="cnn_tiny")
    assert meta == {
        "arch": "cnn_tiny",
        "num_classes": 10,
        "in_channels": 1,
        "test_acc": 0.91,
        "epochs": 3,
        "params": {"lr": 0.1, "tags": ["a", None]},
    }
    assert not loaded.training  # teachers come back in eval mode
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_checkpoint_overwrite_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint(tmp_path / "t.safetensors", _trained_like(), "cnn_tiny", 10, 1)
    before = path.read_bytes()
    written = []

    def crash(fd: int) -> None:  # the bytes are in the temporary file, then the disk fails before it is complete
        written.append(os.fstat(fd).st_size)
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, build_model("cnn_tiny", 10, 1), "cnn_tiny", 10, 1)
    assert written and written[0] > 0  # a partial file did exist...
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # ...not now


def test_checkpoint_extra_validation(tmp_path: Path) -> None:
    model = build_model("cnn_tiny", 10, 1)
    with pytest.raises(ValueError, match="reserved keys"):
        save_checkpoint(tmp_path / "a.safetensors", model, "cnn_tiny", 10, 1, {"arch": "resnet8"})
    with pytest.raises(TypeError, match="'when'.*Path"):
        save_checkpoint(tmp_path / "a.safetensors", model, "cnn_tiny", 10, 1, {"when": tmp_path})
    with pytest.raises(TypeError, match="'w'.*Tensor.*JSON"):  # metadata is JSON in the safetensors header
        save_checkpoint(tmp_path / "a.safetensors", model, "cnn_tiny", 10, 1, {"w": torch.ones(2)})
    assert not list(tmp_path.iterdir())


def test_architecture_mismatch_names_both(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "t.safetensors", build_model("resnet8", 10, 1), "resnet8", 10, 1)
    with pytest.raises(CheckpointError, match=r"'resnet8'.*'wrn-16-2'"):
        load_checkpoint(path, expected_arch="wrn-16-2")
    with pytest.raises(CheckpointError, match=r"'resnet8'.*'resnet14'"):
        load_state_dict_checkpoint(path, "resnet14", 10, 1)
    load_checkpoint(path, expected_arch="ResNet8")  # aliases compare equal


def test_missing_checkpoint_says_how_to_produce_it(tmp_path: Path) -> None:
    path = tmp_path / "teachers" / "cnn_small.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "dvc repro train_teacher@" in message
    assert "teachers.<name>.checkpoint" in message
    with pytest.raises(FileNotFoundError, match="teachers.<name>.checkpoint"):
        load_state_dict_checkpoint(path, "cnn_small", 10, 1)


def test_state_dict_key_mismatch_names_keys_and_file(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = save_checkpoint(tmp_path / "t.safetensors", build_model("cnn_tiny", 10, 1), "cnn_tiny", 10, 1)
    with safe_open(str(path), framework="pt") as f:
        sd, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    sd["head.weight"] = sd.pop("classifier.weight")
    save_file(sd, path, metadata=header)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "'classifier.weight'" in message and "'head.weight'" in message
    assert "missing keys" in message and "unexpected keys" in message


def test_shape_mismatch_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(build_model("cnn_tiny", 10, 1).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"classifier\.weight: file \(10, 64\) vs model \(7, 64\)"):
        load_state_dict_checkpoint(path, "cnn_tiny", num_classes=7, in_channels=1)


def test_bare_and_wrapped_state_dicts(tmp_path: Path) -> None:
    model = _trained_like("resnet8")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    # A bare state_dict, and the CRD/DKD layout: {"model": state_dict of a DataParallel-wrapped net, "epoch": ...}.
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    torch.save({"model": nn.DataParallel(model).state_dict(), "epoch": 240, "accuracy": 72.3}, tmp_path / "crd.pth")
    for name in ("bare.pt", "crd.pth"):
        loaded = load_state_dict_checkpoint(tmp_path / name, "resnet8", num_classes=10, in_channels=1)
        assert not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_unreadable_or_foreign_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint.*junk.pt"):
        load_checkpoint(junk)
    bare = tmp_path / "bare.pt"
    torch.save(build_model("cnn_tiny", 10, 1).state_dict(), bare)
    with pytest.raises(CheckpointError, match="not a kdcache checkpoint.*load_state_dict_checkpoint"):
        load_checkpoint(bare)
    torch.save({"epoch": 3, "lr": 0.1}, junk)
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        load_state_dict_checkpoint(junk, "cnn_tiny", 10, 1)


def test_registry_is_filled_at_the_definition_site_and_listed() -> None:
    """Every family registers its factories with the decorator; `list_models` filters; a duplicate is refused."""
    from pipeline.models import register_model

    assert list_models("resnet*") == sorted(n for n in list_models() if n.startswith("resnet"))
    assert {"cnn_tiny", "wrn_40_2", "mobilenetv2", "shufflenetv2", "vgg13"} <= set(list_models())
    assert canonical_arch("mobile_half") == "mobilenetv2"  # an alias given at registration
    with pytest.raises(ValueError, match="registered twice"):

        @register_model
        def resnet8(num_classes: int, in_channels: int = 3) -> nn.Module:  # noqa: F811
            return nn.Linear(in_channels, num_classes)


def test_kdcache_models_lists_the_registry(capsys) -> None:
    from pipeline.cli import main

    assert main(["models", "wrn*"]) == 0
    out = capsys.readouterr().out
    assert "wrn_40_2" in out and "resnet8" not in out
    assert main(["models", "nothing*"]) == 2


# ---------------------------------------------------------------------------------------------------------------
# safetensors: reproducible bytes, old torch checkpoints, users' files by content
# ---------------------------------------------------------------------------------------------------------------

_WRITE_IN_A_FRESH_PROCESS = """
import sys, torch
from pipeline.models import build_for, save_model
from tests.test_timm import Spec
torch.manual_seed(0)
model = build_for("resnet8", Spec(num_classes=10))
save_model(sys.argv[1], model, "resnet8", {"b": 1, "a": [0.5, None], "name": "t", "z": {"y": 1, "x": 2.5}})
"""


def test_checkpoint_bytes_are_the_same_in_every_process(tmp_path: Path) -> None:
    """DVC hashes and the store's weights_sha256 need equal bytes for equal checkpoints. safetensors keeps header
    metadata in a hash map whose order changes per process, so kdcache writes one sorted JSON string instead."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for path in paths:
        subprocess.run([sys.executable, "-c", _WRITE_IN_A_FRESH_PROCESS, str(path)], cwd=root, check=True)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    _, meta = load_checkpoint(paths[0])
    assert meta["z"] == {"x": 2.5, "y": 1} and meta["preprocess"]["mode"] == "data" and meta["num_classes"] == 10


def test_torch_checkpoints_of_earlier_versions_still_load(tmp_path: Path) -> None:
    from pipeline.models import Preprocess, load_model

    model = _trained_like()
    old = tmp_path / "cnn.pt"  # what save_model wrote before safetensors: torch.save of a dict
    state = {"arch": "cnn_tiny", "num_classes": 10, "in_channels": 1, "state_dict": model.state_dict()}
    torch.save({**state, "mean": [0.3], "std": [0.2], "test_top1": 0.5}, old)
    loaded, meta = load_model(old)
    assert meta["test_top1"] == 0.5 and loaded.preprocess == Preprocess("data", (0.3,), (0.2,))
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model((x - 0.3) / 0.2), rtol=0, atol=0)


def test_weights_files_are_read_by_content_not_name(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from pipeline.models import is_safetensors

    model = _trained_like("resnet8")
    save_file(model.state_dict(), tmp_path / "weights.pth")  # a safetensors file under a torch name
    torch.save(model.state_dict(), tmp_path / "weights.safetensors")  # and the other way round
    x = torch.randn(2, 1, 28, 28)
    for name, st in (("weights.pth", True), ("weights.safetensors", False)):
        assert is_safetensors(tmp_path / name) is st
        loaded = load_state_dict_checkpoint(tmp_path / name, "resnet8", num_classes=10, in_channels=1)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    good = save_checkpoint(tmp_path / "t.safetensors", model, "resnet8", 10, 1).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])  # a truncated download
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*cut.safetensors"):
        load_checkpoint(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="not a kdcache checkpoint"):
        load_checkpoint(tmp_path / "weights.pth")


def test_tied_weights_are_saved_and_restored(tmp_path: Path) -> None:
    """safetensors refuses tensors that share memory; a tied classifier is stored once per name and re-tied."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 10, bias=False)
            self.classifier = nn.Linear(4, 10, bias=False)
            self.classifier.weight = self.embed.weight

    model = Tied()
    path = save_checkpoint(tmp_path / "tied.safetensors", model, "cnn_tiny", 10, 1)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"embed.weight", "classifier.weight"}
        assert torch.equal(f.get_tensor("embed.weight"), model.embed.weight.detach())
