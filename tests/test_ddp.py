"""DDP on CPU: `torchrun --nproc_per_node 2 -m stages.distill` with gloo, on shards that do not split evenly.

The test process prepares a tiny project (shards, a trained teacher, its logit store), then runs
this very file under torchrun as two ranks. Each rank runs the real `stages.distill.main` with
`train` wrapped to record every sample index it trained on, the optimizer steps per epoch and a
hash of the final weights; the test checks that the ranks partition each epoch exactly, ran the
same number of steps, end with identical weights, and that rank 0 alone wrote a sane student.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def _worker(record_dir: str, argv: list[str]) -> None:
    """One torchrun rank: run stages.distill with a recording `train`."""
    import torch

    import pipeline.training.student as student_mod
    import stages.distill as distill

    torch.set_num_threads(1)
    seen: dict[int, list[int]] = {}
    batches: dict[int, int] = {}
    real_train = student_mod.train
    out: dict = {}

    def on_batch(epoch: int, batch: dict) -> None:
        seen.setdefault(epoch, []).extend(batch["index"].tolist())
        batches[epoch] = batches.get(epoch, 0) + 1

    def recording_train(model, *args, **kwargs):
        result = real_train(model, *args, on_batch=on_batch, **kwargs)
        hist = result.history
        h = hashlib.sha256()
        for p in model.parameters():  # parameters only: BatchNorm running stats are per rank between syncs
            h.update(p.detach().cpu().numpy().tobytes())
        out.update(weights=h.hexdigest(), history=hist, world=torch.distributed.get_world_size())
        return result

    student_mod.train = recording_train
    distill.main(argv)
    rank = int(os.environ["RANK"])
    out.update(rank=rank, seen={str(k): v for k, v in seen.items()}, batches={str(k): v for k, v in batches.items()})
    Path(record_dir, f"rank{rank}.json").write_text(json.dumps(out))


def test_torchrun_two_ranks_partition_epochs_and_stay_in_lockstep(tmp_path, monkeypatch):
    from stages import prepare, teach, train_teacher
    from tests.conftest import make_project, tiny_params

    t0 = time.perf_counter()
    params = tiny_params(
        prepare={"options": {"n": 288, "size": 16, "channels": 1, "num_classes": 4, "seed": 0}},  # 5 shards
        distill={
            "epochs": None,
            # batch 16 per rank = 32 globally: the step count of a one-process run at batch 32
            "train": {"epochs": 4, "batch_size": 16, "workers": 1, "shuffle_buffer": 64, "threads": 1},
        },
    )
    params["distill"].pop("epochs")
    params["distill"]["train"]["optim"] = {"lr": 0.1, "warmup_epochs": 0.3}
    proj = make_project(tmp_path / "proj", params)
    monkeypatch.chdir(proj)
    prepare.main([])
    train_teacher.main(["--name", "small"])
    teach.main(["--name", "small"])
    manifest = json.loads(Path("data/shards/tiny/manifest.json").read_text())
    n = manifest["splits"]["train"]["n"]
    assert len(manifest["splits"]["train"]["shards"]) % WORLD == 1  # ranks get unequal sample counts

    rec = tmp_path / "rec"
    rec.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", KDCACHE_DEVICE="cpu", KDCACHE_LOG="WARNING")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
        str(Path(__file__)), "--record", str(rec), "--teacher", "small", "--loss", "kd",
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]

    ranks = [json.loads((rec / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert all(r["world"] == WORLD for r in ranks)
    for epoch in ("0", "1", "2", "3"):
        parts = [r["seen"][epoch] for r in ranks]
        assert sorted(parts[0] + parts[1]) == list(range(n)), f"epoch {epoch}: not every index exactly once"
        assert len(parts[0]) != len(parts[1])  # the uneven case the lockstep logic exists for
        steps = {r["history"][int(epoch)]["steps"] for r in ranks}
        assert steps == {max(r["batches"][epoch] for r in ranks)}  # same optimizer steps on every rank
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the replicas identical
    assert ranks[0]["history"] == ranks[1]["history"]  # rank 0's metrics, broadcast

    # Only rank 0 wrote outputs, once; the student is sane.
    curves = json.loads(Path("plots/curves/small-kd-full-0.json").read_text())
    assert [r["epoch"] for r in curves] == [1, 2, 3, 4]
    assert np.isfinite(curves[-1]["train_loss"])
    teacher_acc = json.loads(Path("metrics/teachers/small.json").read_text())["accuracy"]
    assert curves[-1]["val_acc"] > 0.7, (curves, teacher_acc)  # 4 classes: chance is 0.25 (1 process: ~0.9)
    assert Path("data/students/small-kd-full-0/model.safetensors").exists()
    assert sorted(p.name for p in Path("data/students/small-kd-full-0").iterdir()) == [
        "history.json", "model.safetensors",
    ]  # fmt: skip
    assert not Path("checkpoints/distill/small-kd-full-0").exists()  # the resume state went with the finished run
    assert time.perf_counter() - t0 < 60


if __name__ == "__main__":
    # torchrun entry: test_ddp.py --record DIR <stages.distill args...>
    assert sys.argv[1] == "--record"
    _worker(sys.argv[2], sys.argv[3:])
