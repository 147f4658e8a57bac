"""README "Bring your own data and teacher": its params snippets, exactly as printed, on tiny local data.

The snippets name an HF dataset folder (`hf/cifar10`) and a timm teacher's safetensors checkpoint; this test makes
both (a `datasets`-written CIFAR-10 look-alike; a random-init timm ResNet-18 saved with safetensors in timm's own
key names), merges the snippets into the tiny test params (the snippets' keys win and are taken verbatim), and runs
prepare -> train_teacher (imports the checkpoint) -> teach -> distill.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

timm = pytest.importorskip("timm")
datasets = pytest.importorskip("datasets")

from pipeline.cache.store import LogitStore  # noqa: E402
from pipeline.data.shards import load_manifest, read_rows  # noqa: E402
from pipeline.layout import Layout  # noqa: E402
from pipeline.models import build_for, load_model, predict_arrays  # noqa: E402
from stages import distill, prepare, teach, train_teacher  # noqa: E402
from tests.conftest import ROOT, make_project, tiny_params  # noqa: E402

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def readme_snippets(section: str = "## Bring your own data and teacher") -> list[dict]:
    """The ```yaml blocks of one README section, parsed."""
    text = (ROOT / "README.md").read_text()
    body = text.split(section, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^[ \t]*```yaml\n(.*?)^[ \t]*```", body, flags=re.S | re.M)
    return [yaml.safe_load(_dedent(b)) for b in blocks]


def _dedent(block: str) -> str:
    lines = block.splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\n".join(line[indent:] for line in lines)


def make_cifar_like(root: Path, n: dict[str, int]) -> None:
    """A DatasetDict with CIFAR-10's columns (`img`: Image, `label`: ClassLabel) and 32x32 RGB images."""
    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10)})
    splits = {}
    for split, count in n.items():
        labels = [i % 10 for i in range(count)]
        images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in labels]
        splits[split] = datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(root))


def fit_head(net: torch.nn.Module, spec: dict, manifest) -> None:
    """Set the random backbone's classifier by least squares on its features of the train + val images, so the
    imported teacher is right on them (a random-init teacher is near chance, which the teacher check refuses)."""
    model = build_for(spec["arch"], manifest, spec.get("preprocess", "data"))
    model.net.load_state_dict(net.state_dict())
    head = model.net.get_classifier()
    feats: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, inp, out: feats.append(inp[0].detach()))
    images, labels = [], []
    for split in ("train", "val"):
        rows = np.arange(manifest.split(split).n)
        imgs, ys = read_rows(manifest, split, rows)
        images.append(imgs)
        labels.append(ys)
    predict_arrays(model.eval(), np.concatenate(images), 64)
    hook.remove()
    x = torch.cat(feats).double()  # (N, D)
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    y = torch.nn.functional.one_hot(torch.from_numpy(np.concatenate(labels)), 10).double() * 10  # (N, 10)
    w = torch.linalg.lstsq(x1, y).solution  # (D + 1, 10)
    with torch.no_grad():
        net.get_classifier().weight.copy_(w[:-1].T.float())
        net.get_classifier().bias.copy_(w[-1].float())


def test_readme_snippets_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snippets = readme_snippets()
    assert len(snippets) == 2, "the section shows one data snippet and one teacher snippet"
    data, teacher = snippets
    assert data["prepare"]["source"] == "hf" and set(teacher) == {"teachers", "distill"}
    ((name, spec),) = teacher["teachers"].items()
    assert spec["arch"].startswith("timm:") and spec["checkpoint"].endswith(".safetensors")

    params = tiny_params(prepare={"limit": None, "shard_size": 16})
    for snippet in snippets:
        for sec, values in snippet.items():
            if sec == "teachers":
                params[sec] = values  # the zoo is the snippet's
            else:
                params[sec].update(values)
    make_project(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    make_cifar_like(Path(data["prepare"]["root"]), {"train": 50, "test": 10})
    prepare.main([])
    layout = Layout(data["prepare"]["name"])
    manifest = json.loads((layout.shards / "manifest.json").read_text())
    assert manifest["classes"] == CIFAR10 and manifest["image_shape"] == [32, 32, 3]
    n = {k: v["n"] for k, v in manifest["splits"].items()}
    assert n["train"] + n["val"] == 50 and n["test"] == 10

    torch.manual_seed(0)
    arch = spec["arch"].split(":", 1)[1]
    net = timm.create_model(arch, pretrained=False, num_classes=10).eval()
    fit_head(net, spec, load_manifest(layout.shards))  # a teacher that knows these images: the teacher check passes
    weights = Path(spec["checkpoint"])
    weights.parent.mkdir(parents=True, exist_ok=True)  # the project's weights/ folder (make_project copies it)
    from safetensors.torch import save_file

    save_file(net.state_dict(), weights)  # as timm writes model.safetensors

    train_teacher.main(["--name", name])
    info = json.loads(layout.teacher_details(name).read_text())
    assert info["source"] == str(weights) and info["arch"] == spec["arch"]
    model, meta = load_model(layout.teacher_checkpoint(name))
    assert meta["preprocess"]["mode"] == "model" and meta["preprocess"]["input_size"] == [224, 224]
    for key, value in net.state_dict().items():  # the user's weights, unchanged, in timm's key names
        assert torch.equal(model.net.state_dict()[key], value), key

    teach.main(["--name", name])
    store = LogitStore(layout.store(name), "train")
    assert store.teacher["preprocess"] == meta["preprocess"] and np.isfinite(store.read_all()).all()

    distill.main(["--teacher", name, "--loss", "kd"])
    student, smeta = load_model(layout.student_model(f"{name}-kd-full-0"))
    assert smeta["arch"] == "cnn_tiny" and student.preprocess.input_size is None  # the student stays at 32 px
