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
from pipeline.layout import Layout  # noqa: E402
from pipeline.models import load_model  # noqa: E402
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
    make_cifar_like(Path(data["prepare"]["root"]), {"train": 20, "test": 10})
    torch.manual_seed(0)
    arch = spec["arch"].split(":", 1)[1]
    net = timm.create_model(arch, pretrained=False, num_classes=10).eval()
    weights = Path(spec["checkpoint"])
    weights.parent.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file(net.state_dict(), weights)  # as timm writes model.safetensors

    prepare.main([])
    layout = Layout(data["prepare"]["name"])
    manifest = json.loads((layout.shards / "manifest.json").read_text())
    assert manifest["classes"] == CIFAR10 and manifest["image_shape"] == [32, 32, 3]
    assert manifest["splits"]["train"]["n"] == 20 and manifest["splits"]["test"]["n"] == 10

    train_teacher.main(["--name", name])
    info = json.loads(layout.teacher_metrics(name).read_text())
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
