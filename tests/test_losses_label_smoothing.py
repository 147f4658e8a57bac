"""Label smoothing belongs to the loss: every loss's CE term takes it, the same way (issue 31 item 2).

Reference: the smoothed CE written out by hand (Szegedy et al. 2016), not torch's `label_smoothing` argument:
``CE_eps = -mean_i [(1 - eps) log p_i[y_i] + eps / C * sum_c log p_i[c]]``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, DistillConfig, from_dict
from pipeline.losses import LOSSES, LossConfigError, build_loss, default_params
from pipeline.training.loop import compute_loss

C = 7


def smoothed_ce(s: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """The label-smoothed CE in float64, by its formula."""
    logp = torch.log_softmax(s.double(), dim=1)  # (B, C)
    picked = logp.gather(1, y[:, None]).squeeze(1)  # (B,)
    return -((1 - eps) * picked + eps / s.shape[1] * logp.sum(1)).mean()


def inputs(seed: int, b: int = 16, members: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, C, generator=g, dtype=torch.float64)
    t = 2 * torch.randn(b, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (b,), generator=g)
    extra = {"members": torch.stack([t, t.flip(1)], 1)} if members else {}
    return {"s": s, "t": t, "y": y, **extra}


def call(loss, x: dict) -> dict:
    kw = {"members": x["members"]} if "members" in x else {}
    groups = torch.arange(len(x["y"])).reshape(-1, 4) if "groups" in loss.reads else None
    return loss(x["s"], x["t"], x["y"], epoch=1.0, groups=groups, **kw)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_every_loss_smooths_its_ce_term(name: str, eps: float) -> None:
    x = inputs(1, members=name == "mtkd")
    plain = call(build_loss(name), x)
    smooth = call(build_loss(name, label_smoothing=eps), x)
    torch.testing.assert_close(smooth["ce"], smoothed_ce(x["s"], x["y"], eps), rtol=1e-12, atol=1e-12)
    # Only the CE term changes: the distillation part of the total is the same.
    w = build_loss(name).ce_weight
    torch.testing.assert_close(smooth["loss"] - w * smooth["ce"], plain["loss"] - w * plain["ce"])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_zero_is_plain_cross_entropy_bit_for_bit(name: str) -> None:
    x = inputs(2, members=name == "mtkd")
    a, b = call(build_loss(name), x), call(build_loss(name, label_smoothing=0.0), x)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "label_smoothing" not in repr(build_loss(name))  # default runs keep their repr (resume fingerprints)
    assert "label_smoothing=0.1" in repr(build_loss(name, label_smoothing=0.1))
    assert default_params(name)["label_smoothing"] == 0.0


@settings(max_examples=25, deadline=None)
@given(eps=st.floats(0.0, 0.95), seed=st.integers(0, 10_000))
def test_kd_ce_term_matches_the_formula(eps: float, seed: int) -> None:
    x = inputs(seed)
    out = call(build_loss("kd", label_smoothing=eps), x)
    assert abs(out["ce"].item() - smoothed_ce(x["s"], x["y"], eps).item()) < 1e-10


def test_a_combination_smooths_its_one_ce_term() -> None:
    x = inputs(3)
    loss = build_loss("dkd+cmkd", label_smoothing=0.2, weights={"ce": 0.5})
    torch.testing.assert_close(call(loss, x)["ce"], smoothed_ce(x["s"], x["y"], 0.2))
    with pytest.raises(LossConfigError, match="label_smoothing belongs to the combination"):
        build_loss("dkd+cmkd", dkd={"label_smoothing": 0.1})


@pytest.mark.parametrize("bad", [1.0, -0.1, "0.1", True, float("nan")])
def test_bad_values_are_refused(bad: object) -> None:
    with pytest.raises(LossConfigError, match="label_smoothing"):
        build_loss("kd", label_smoothing=bad)


def test_rows_without_teacher_logits_are_smoothed_like_the_loss() -> None:
    """Budget runs with `unqueried: ce`: the rows the teacher never saw get the loss's own smoothed CE."""
    x = inputs(4)
    has = np.zeros(len(x["y"]), dtype=bool)
    has[:5] = True
    loss = build_loss("kd", label_smoothing=0.2)
    parts = compute_loss(loss, x["s"], x["t"], x["y"], has, 1.0, 0.0)
    rest = ~has
    torch.testing.assert_close(parts["ce_unqueried"].double(), smoothed_ce(x["s"][rest], x["y"][rest], 0.2))


def test_distill_optim_label_smoothing_names_its_home() -> None:
    """The old key would smooth only CE students (the unfair comparison the review found): refused, with the fix."""
    with pytest.raises(ConfigError, match=r"distill\.loss_params\.<loss>\.label_smoothing"):
        from_dict(DistillConfig, {"train": {"optim": {"label_smoothing": 0.1}}}, "distill")
    assert from_dict(DistillConfig, {"train": {"optim": {"label_smoothing": 0.0}}}, "distill")
