"""Any teacher (issue 28): your own model code (`arch: py:<module>:<callable>`) and files that carry their code
(`.pt2` torch.export programs, `.onnx` models run by onnxruntime), as teachers and (py:) students.

Unit tests build from small files written here; the end-to-end test trains a `py:` teacher with the stages,
exports it to both file formats, imports them as teachers, caches all three and distils a `py:` student.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from pipeline.config import ConfigError, TeacherSpec, from_dict
from pipeline.inputs import student_inputs, teacher_inputs, write_teacher_inputs
from pipeline.models import build_for, import_model, load_model, predict_arrays, save_model
from pipeline.models.checkpoint import CheckpointError
from pipeline.models.exported import OnnxNet
from tests.conftest import TINY_PARAMS, bump_export_schema, make_project, tiny_params

TINY_TEACHER = TINY_PARAMS["teachers"]["small"]

onnx = pytest.importorskip("onnx")  # torch.onnx.export writes through it (a test dependency)
pytest.importorskip("onnxruntime")

NET_PY = '''
import torch
from torch import nn


class Net(nn.Module):
    """A small CNN written by a user (not in kdcache's zoo)."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.head = nn.Linear(width * 16, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def bare():
    return Net(4, 1)


def any_kwargs(**kw):
    return Net(**kw)


def needs_depth(num_classes, depth):
    return Net(num_classes)


def seven(num_classes, in_channels):
    return Net(7, in_channels)


def pair(num_classes, in_channels):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net(num_classes, in_channels)

        def forward(self, x):
            y = self.net(x)
            return y, y

    return Two()


def not_a_module():
    return 3


NOT_CALLABLE = 3
'''


@pytest.fixture
def net_py(tmp_path: Path) -> Path:
    path = tmp_path / "weights" / "net.py"
    path.parent.mkdir()
    path.write_text(NET_PY)
    return path


# ---------------------------------------------------------------------------------------------
# py: your own code


@pytest.mark.parametrize("attr", ["Net", "bare", "any_kwargs"])
def test_a_py_callable_is_built_with_the_arguments_it_accepts(net_py, tiny_manifest, attr):
    model = build_for(f"py:{net_py}:{attr}", tiny_manifest)
    assert type(model.net).__name__ == "Net" and type(model.net).__module__.startswith("kdcache_py_net_")
    assert model.net.head.out_features == 4 and model.net.body[0].in_channels == 1  # the data set's
    assert model(torch.rand(3, 1, 16, 16)).shape == (3, 4)


def test_a_py_module_on_pythonpath(net_py, tiny_manifest, monkeypatch):
    pkg = net_py.parent / "usernets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "small.py").write_text(NET_PY)
    monkeypatch.syspath_prepend(str(net_py.parent))
    model = build_for("py:usernets.small:Net", tiny_manifest)
    assert model.net.head.out_features == 4
    from pipeline.models.usercode import code_identity

    ident = code_identity("py:usernets.small:Net")
    assert ident["file"] == str(pkg / "small.py") and ident["callable"] == "Net"
    sys.modules.pop("usernets.small", None)
    sys.modules.pop("usernets", None)


@pytest.mark.parametrize(
    ("attr", "source", "message"),
    [
        ("needs_depth", NET_PY, r"needs arguments \['depth'\] that kdcache cannot give.*def build\(num_classes"),
        ("seven", NET_PY, r"returns logits of shape \(2, 7\) .* data set has 4 classes"),
        ("pair", NET_PY, r"returns a tuple, not a logits tensor"),
        ("not_a_module", NET_PY, r"returned a int, not a torch nn.Module"),
        ("NOT_CALLABLE", NET_PY, r"NOT_CALLABLE is a int, not a class or function"),
        ("Nett", NET_PY, r"has no 'Nett'; close matches: \['Net'\]"),
        (
            "Net",
            "import torch\nfrom torch import nn\nclass Net(nn.Module:\n",
            r"importing .*net.py failed: SyntaxError",
        ),
        ("Net", "import not_installed_pkg\n", r"importing .*net.py failed: ModuleNotFoundError: No module named"),
    ],
)
def test_py_mistakes_are_one_line_naming_the_architecture(net_py, tiny_manifest, attr, source, message):
    net_py.write_text(source)
    with pytest.raises(ConfigError, match=message) as info:
        build_for(f"py:{net_py}:{attr}", tiny_manifest)
    assert "\n" not in str(info.value) and f"py:{net_py}:{attr}" in str(info.value)


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("py:weights/net.py", r"expected 'py:<module>:<callable>'"),
        ("py:missing/net.py:Net", r"missing/net.py is not a file"),
        ("py:no_such_module_here:Net", r"no module 'no_such_module_here' on PYTHONPATH"),
    ],
)
def test_a_py_arch_that_names_nothing(tiny_manifest, arch, message):
    with pytest.raises(ConfigError, match=message):
        build_for(arch, tiny_manifest)


def test_a_py_checkpoint_records_its_code_and_refuses_edited_code(net_py, tiny_manifest, tmp_path):
    arch = f"py:{net_py}:Net"
    model = build_for(arch, tiny_manifest)
    save_model(tmp_path / "t.safetensors", model, arch)
    loaded, meta = load_model(tmp_path / "t.safetensors", data=tiny_manifest)
    assert meta["code"]["callable"] == "Net" and meta["code"]["file"] == str(net_py)
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded(x), model.eval()(x))
    net_py.write_text(NET_PY + "\n# an edit\n")
    with pytest.raises(ConfigError, match=r"was written with .*net.py at sha256 .* but that code is now"):
        load_model(tmp_path / "t.safetensors", data=tiny_manifest)


def test_a_users_state_dict_for_py_code_names_missing_keys(net_py, tiny_manifest, tmp_path):
    state = build_for(f"py:{net_py}:Net", tiny_manifest).net.state_dict()
    del state["head.bias"]
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \['head.bias'\]"):
        import_model(tmp_path / "w.pth", f"py:{net_py}:Net", tiny_manifest)


def test_the_code_file_is_fingerprinted_for_dvc(net_py, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    zoo = {"mine": TeacherSpec(arch="py:weights/net.py:Net"), "demo": TeacherSpec(arch="cnn_tiny")}
    paths = write_teacher_inputs(zoo, "out")
    before = {n: p.read_bytes() for n, p in paths.items()}
    assert [f["path"] for f in json.loads(before["mine"])["files"]] == ["weights/net.py"]
    student = student_inputs("py:weights/net.py:Net")
    net_py.write_text(NET_PY + "\n# an edit\n")  # editing the model file changes its teacher's fingerprint only
    after = {n: p.read_bytes() for n, p in write_teacher_inputs(zoo, "out").items()}
    assert [n for n in before if before[n] != after[n]] == ["mine"]
    assert student_inputs("py:weights/net.py:Net") != student and student_inputs("cnn_tiny")["files"] == []
    outside = tmp_path / "elsewhere.py"
    outside.write_text(NET_PY)
    with pytest.raises(ConfigError, match=r"teachers.x.arch: .*elsewhere.py is outside weights/.*ln -s"):
        teacher_inputs("x", TeacherSpec(arch=f"py:{outside}:Net"))
    with pytest.raises(ConfigError, match=r"distill.student: .*elsewhere.py is outside weights/"):
        student_inputs(f"py:{outside}:Net")
    (tmp_path / "weights" / "linked.py").symlink_to(outside)  # a module found at its real path, linked from weights/
    assert teacher_inputs("x", TeacherSpec(arch=f"py:{outside}:Net"))["files"][0]["path"] == str(outside)


# ---------------------------------------------------------------------------------------------
# files that carry their code: .pt2 and .onnx


class NHWC(nn.Module):
    """A network that takes channels-last input, as TensorFlow/Keras exports do."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        return self.net(x.permute(0, 3, 1, 2))


def export_onnx(net: nn.Module, path: Path, shape: tuple[int, ...], dynamic: dict | None = None) -> Path:
    axes = {"x": {0: "b"}} if dynamic is None else dynamic
    with torch.no_grad():
        torch.onnx.export(
            net.eval(), (torch.zeros(shape),), str(path), dynamo=False, input_names=["x"], dynamic_axes=axes
        )
    return path


def export_pt2(net: nn.Module, path: Path, shape: tuple[int, ...]) -> Path:
    ep = torch.export.export(net.eval(), (torch.zeros(shape),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(ep, str(path))
    return path


@pytest.fixture
def teacher_net(tiny_manifest) -> nn.Module:
    torch.manual_seed(0)
    return build_for("cnn_tiny", tiny_manifest).eval()


@pytest.mark.parametrize("fmt", ["export", "onnx"])
def test_a_model_file_teaches_what_the_same_model_in_pytorch_does(fmt, teacher_net, tiny_manifest, tmp_path):
    shape = (2, 1, 16, 16)
    write = export_pt2 if fmt == "export" else export_onnx
    path = write(teacher_net.net, tmp_path / f"t.{'pt2' if fmt == 'export' else 'onnx'}", shape)
    spec = from_dict(TeacherSpec, {"checkpoint": str(path)}, "teachers.t")
    assert spec.arch == fmt  # inferred from the extension
    model = import_model(path, spec.arch, tiny_manifest)
    images = np.random.default_rng(0).integers(0, 256, (70, 16, 16, 1), dtype=np.uint8)
    ours, theirs = predict_arrays(model, images, 32), predict_arrays(teacher_net, images, 32)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)  # onnxruntime's kernels: equal to float32 rounding
    # the kdcache checkpoint carries the program; loading it gives the same logits, bit for bit
    save_model(tmp_path / "k.safetensors", model, spec.arch)
    again, meta = load_model(tmp_path / "k.safetensors", data=tiny_manifest)
    assert meta["arch"] == fmt and meta["num_classes"] == 4
    assert np.array_equal(predict_arrays(again, images, 32), ours)


def test_an_nhwc_onnx_model_is_fed_channels_last(teacher_net, tiny_manifest, tmp_path):
    path = export_onnx(NHWC(teacher_net.net), tmp_path / "t.onnx", (2, 16, 16, 1))
    model = import_model(path, "onnx", tiny_manifest)
    assert isinstance(model.net, OnnxNet) and model.net.nhwc
    images = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 1), dtype=np.uint8)
    np.testing.assert_allclose(predict_arrays(model, images, 8), predict_arrays(teacher_net, images, 8), atol=1e-5)


def test_preprocess_model_resizes_to_the_files_input_size(teacher_net, tiny_manifest, tmp_path):
    path = export_onnx(teacher_net.net, tmp_path / "t.onnx", (2, 1, 24, 24))  # a model for 24x24 inputs
    with pytest.raises(ConfigError, match=r"takes only 24x24 inputs but would see 16x16 images: set preprocess: model"):
        import_model(path, "onnx", tiny_manifest)
    model = import_model(path, "onnx", tiny_manifest, preprocess="model")
    assert model.preprocess.input_size == (24, 24)
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 4)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("dynamic_model", r"preprocess: model takes the input size from the file, but its input size is dynamic"),
        ("channels", r"takes 3-channel images but the data set has 1"),
        ("classes", r"returns logits of shape \(2, 7\) .* data set has 4 classes"),
        ("html", r"is not an ONNX model onnxruntime can run"),
        ("two_inputs", r"takes 2 inputs"),
    ],
)
def test_onnx_bad_input_is_one_line(case, tiny_manifest, tmp_path, message):
    torch.manual_seed(0)
    path = tmp_path / "t.onnx"
    preprocess = "data"
    if case == "dynamic_model":
        net = build_for("cnn_tiny", tiny_manifest).net
        export_onnx(net, path, (2, 1, 16, 16), {"x": {0: "b", 2: "h", 3: "w"}})
        preprocess = "model"
    elif case == "channels":
        export_onnx(build_for("cnn_tiny", _with_channels(tiny_manifest, 3)).net, path, (2, 3, 16, 16))
    elif case == "classes":
        export_onnx(build_for("cnn_tiny", _with_classes(tiny_manifest, 7)).net, path, (2, 1, 16, 16))
    elif case == "html":
        path.write_text("<html><body>502 Bad Gateway</body></html>")
    else:

        class Two(nn.Module):
            def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                return (a + b).flatten(1)[:, :4]

        with torch.no_grad():
            torch.onnx.export(Two(), (torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16)), str(path), dynamo=False)
    with pytest.raises((ConfigError, CheckpointError), match=message) as info:
        import_model(path, "onnx", tiny_manifest, preprocess)
    assert "\n" not in str(info.value)


def _with_channels(manifest, c):
    import dataclasses

    h, w, _ = manifest.image_shape
    return dataclasses.replace(manifest, image_shape=(h, w, c), mean=[0.5] * c, std=[0.25] * c)


def _with_classes(manifest, k):
    import dataclasses

    return dataclasses.replace(manifest, classes=[f"c{i}" for i in range(k)])


def test_a_pt2_saved_by_a_newer_torch_says_so(teacher_net, tiny_manifest, tmp_path):
    path = export_pt2(teacher_net.net, tmp_path / "t.pt2", (2, 1, 16, 16))
    newer = bump_export_schema(path, tmp_path / "newer.pt2")
    with pytest.raises(ConfigError, match=r"was saved by a newer torch \(export schema \d+\.\d+; this torch"):
        import_model(newer, "export", tiny_manifest)
    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match=r"bad.pt2 is not a torch.export program"):
        import_model(tmp_path / "bad.pt2", "export", tiny_manifest)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"checkpoint": "weights/t.pth"}, r"teachers.t.arch: required"),
        ({"arch": "onnx"}, r"teachers.t.checkpoint: required by arch: onnx"),
    ],
)
def test_teacher_entries_for_files(entry, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TeacherSpec, entry, "teachers.t")


def test_a_file_given_with_another_arch_is_named(teacher_net, tiny_manifest, tmp_path):
    path = export_onnx(teacher_net.net, tmp_path / "t.onnx", (2, 1, 16, 16))
    with pytest.raises(CheckpointError, match=r"is an ONNX model file, but architecture 'cnn_tiny' was given"):
        import_model(path, "cnn_tiny", tiny_manifest)
    with pytest.raises(ConfigError, match=r"'onnx' is a model file, not something kdcache builds"):
        build_for("onnx", tiny_manifest)


# ---------------------------------------------------------------------------------------------
# end to end through the stages


@pytest.mark.slow
def test_py_teacher_exported_files_and_py_student_through_the_stages(tmp_path: Path) -> None:
    from pipeline.cache.store import LogitStore
    from pipeline.layout import Layout
    from stages import distill, prepare, teach, teachers, train_teacher

    proj = make_project(tmp_path / "proj")
    (proj / "weights" / "net.py").write_text(NET_PY)
    mine = {**TINY_TEACHER, "arch": "py:weights/net.py:Net"}
    params = tiny_params(
        teachers={"mine": mine},
        distill={"teachers": ["mine"], "losses": ["kd"], "student": "py:weights/net.py:bare"},
    )
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(proj)
    try:
        prepare.main([])
        layout = Layout(params["prepare"]["name"])
        train_teacher.main(["--name", "mine"])  # a demo teacher trained from your code
        model, meta = load_model(layout.teacher_checkpoint("mine"))
        assert meta["arch"] == "py:weights/net.py:Net" and meta["code"]["file"] == "weights/net.py"
        # export the trained teacher both ways, and import the files as two more teachers
        h, w, c = json.loads((layout.shards / "manifest.json").read_text())["image_shape"]
        export_pt2(model.net, Path("weights/mine.pt2"), (2, c, h, w))
        export_onnx(model.net, Path("weights/mine.onnx"), (2, c, h, w))
        params["teachers"].update(
            {"pt2": {"checkpoint": "weights/mine.pt2"}, "ox": {"checkpoint": "weights/mine.onnx"}}
        )
        Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        teachers.main([])
        fp = json.loads(layout.teacher_inputs("mine").read_text())
        assert [f["path"] for f in fp["files"]] == ["weights/net.py"]
        assert json.loads(layout.student_inputs.read_text())["files"][0]["path"] == "weights/net.py"
        stores = {}
        for name in ("mine", "pt2", "ox"):
            if name != "mine":
                train_teacher.main(["--name", name])
            teach.main(["--name", name])
            stores[name] = LogitStore(layout.store(name), "train")
        assert stores["mine"].teacher["code"]["sha256"] == meta["code"]["sha256"]
        assert stores["pt2"].teacher["arch"] == "export" and stores["ox"].teacher["arch"] == "onnx"
        ref = stores["mine"].read_all()
        assert np.array_equal(stores["pt2"].read_all(), ref)  # the same graph and kernels: the same float16 logits
        np.testing.assert_allclose(stores["ox"].read_all(), ref, atol=2e-2, rtol=2e-3)  # onnxruntime: float16 ulps
        distill.main(["--teacher", "ox", "--loss", "kd"])  # a py: student from the ONNX teacher's cache
        _, smeta = load_model(layout.student_model("ox-kd-full-0"))
        assert smeta["arch"] == "py:weights/net.py:bare" and smeta["code"]["callable"] == "bare"
    finally:
        os.chdir(cwd)


def test_onnx_session_is_not_pickled_into_the_checkpoint(teacher_net, tiny_manifest, tmp_path):
    """The checkpoint holds the program bytes only (one uint8 tensor), so it is as safe to load as any safetensors."""
    from safetensors import safe_open

    path = export_onnx(teacher_net.net, tmp_path / "t.onnx", (2, 1, 16, 16))
    save_model(tmp_path / "k.safetensors", import_model(path, "onnx", tiny_manifest), "onnx")
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert list(f.keys()) == ["program"]
        assert f.get_tensor("program").numpy().tobytes() == path.read_bytes()
