"""Golden-value, behaviour and error tests for pipeline.losses.

The golden references below are deliberately naive: Python loops over samples and classes, float64
via the ``math`` module, written from the papers' formulas and sharing no code with the package.
The package computes in float32 on float32 inputs; agreement is required to 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses import LOSSES, CombinedLoss, LossConfigError, build_loss

RTOL = ATOL = 1e-5
SHAPES_T = [(4, 5, 1.0), (7, 3, 2.5), (16, 10, 4.0), (32, 100, 4.0)]


# --------------------------------------------------------------------------------------------------
# naive float64 references
# --------------------------------------------------------------------------------------------------


def rows(x: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in x.detach().double().tolist()]


def n_softmax(z: list[float], T: float = 1.0) -> list[float]:
    m = max(v / T for v in z)
    e = [math.exp(v / T - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def n_log_softmax(z: list[float], T: float = 1.0) -> list[float]:
    m = max(v / T for v in z)
    lse = m + math.log(sum(math.exp(v / T - m) for v in z))
    return [v / T - lse for v in z]


def n_kl(p_logits: list[float], q_logits: list[float], T: float) -> float:
    """KL(softmax(p/T) || softmax(q/T))."""
    lp, lq = n_log_softmax(p_logits, T), n_log_softmax(q_logits, T)
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq, strict=True))


def n_ce(S: list[list[float]], y: list[int]) -> float:
    return sum(-n_log_softmax(s)[yi] for s, yi in zip(S, y, strict=True)) / len(S)


def n_mean(v: list[float]) -> float:
    return sum(v) / len(v)


def n_pearson(a: list[float], b: list[float], eps: float = 1e-8) -> float:
    ma, mb = n_mean(a), n_mean(b)
    ca, cb = [x - ma for x in a], [x - mb for x in b]
    num = sum(x * y for x, y in zip(ca, cb, strict=True))
    return num / (math.sqrt(sum(x * x for x in ca)) * math.sqrt(sum(y * y for y in cb)) + eps)


def n_zscore(z: list[float], eps: float = 1e-7) -> list[float]:
    m = n_mean(z)
    std = math.sqrt(sum((v - m) ** 2 for v in z) / (len(z) - 1))
    return [(v - m) / (std + eps) for v in z]


def n_entropy(z: list[float]) -> float:
    return -sum(p * math.log(p) for p in n_softmax(z) if p > 0)


def n_isotonic_decreasing(y: list[float]) -> list[float]:
    """Pool-adjacent-violators: argmin ||v - y||^2 subject to v_1 >= v_2 >= ... >= v_n."""
    blocks: list[list[float]] = []  # [sum, count]
    for value in y:
        blocks.append([value, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    out: list[float] = []
    for s, c in blocks:
        out.extend([s / c] * int(c))
    return out


def n_soft_rank(x: list[float], strength: float) -> list[float]:
    """Blondel et al. 2020, l2: Euclidean projection of x/strength onto the permutahedron of (1..n).

    Sort theta descending (s), solve the isotonic problem on s - (n, ..., 1), primal = s - dual.
    """
    n = len(x)
    theta = [v / strength for v in x]
    order = sorted(range(n), key=lambda i: -theta[i])
    s = [theta[i] for i in order]
    w = [float(n - j) for j in range(n)]
    dual = n_isotonic_decreasing([a - b for a, b in zip(s, w, strict=True)])
    ranks = [0.0] * n
    for j, i in enumerate(order):
        ranks[i] = s[j] - dual[j]
    return ranks


def ref_kd(S, Tt, y, T, a, b):
    kd = T * T * n_mean([n_kl(t, s, T) for s, t in zip(S, Tt, strict=True)])
    return {"loss": a * n_ce(S, y) + b * kd, "ce": n_ce(S, y), "kd": kd}


def ref_dkd_parts(S, Tt, y, T):
    tckd, nckd = [], []
    for s, t, yi in zip(S, Tt, y, strict=True):
        ps, pt = n_softmax(s, T), n_softmax(t, T)
        # binary (target, rest); the rest mass summed from the other classes for accuracy
        rs = sum(p for c, p in enumerate(ps) if c != yi)
        rt = sum(p for c, p in enumerate(pt) if c != yi)
        tckd.append(pt[yi] * math.log(pt[yi] / ps[yi]) + rt * math.log(rt / rs))
        # among non-target classes, renormalised
        kl = 0.0
        for c in range(len(s)):
            if c != yi:
                kl += (pt[c] / rt) * math.log((pt[c] / rt) / (ps[c] / rs))
        nckd.append(kl)
    return T * T * n_mean(tckd), T * T * n_mean(nckd)


def ref_dkd(S, Tt, y, T, alpha, beta, warmup, epoch, ce_weight):
    tckd, nckd = ref_dkd_parts(S, Tt, y, T)
    factor = min(epoch / warmup, 1.0) if warmup else 1.0
    return {
        "loss": ce_weight * n_ce(S, y) + factor * (alpha * tckd + beta * nckd),
        "ce": n_ce(S, y),
        "tckd": tckd,
        "nckd": nckd,
        "warmup": factor,
    }


def ref_dist(S, Tt, y, T, beta, gamma, w, ce_weight):
    PS = [n_softmax(s, T) for s in S]
    PT = [n_softmax(t, T) for t in Tt]
    inter = 1 - n_mean([n_pearson(a, b) for a, b in zip(PS, PT, strict=True)])
    B, C = len(S), len(S[0])
    if B > 1:
        intra = 1 - n_mean([n_pearson([PS[i][c] for i in range(B)], [PT[i][c] for i in range(B)]) for c in range(C)])
        rel = beta * inter + gamma * intra
    else:
        intra, rel = 0.0, beta * inter
    return {"loss": ce_weight * n_ce(S, y) + w * T * T * rel, "ce": n_ce(S, y), "inter": inter, "intra": intra}


def ref_cmkd(
    S,
    Tt,
    y,
    *,
    T,
    scale,
    strength,
    w_major,
    w_minor,
    heavy_when,
    pearson=True,
    spearman=True,
    use_z=True,
    weighting=True,
    ce_weight=1.0,
):
    B = len(S)
    H = [n_entropy(t) for t in Tt]
    Hbar = n_mean(H)
    lp_all, ls_all, per = [], [], []
    for i in range(B):
        zs = n_zscore(S[i]) if use_z else S[i]
        zt = n_zscore(Tt[i]) if use_z else Tt[i]
        lp = 1 - n_pearson(n_softmax(zs, T), n_softmax(zt, T))
        ls = 1 - n_pearson(n_soft_rank(zs, strength), n_soft_rank(zt, strength))
        lp_all.append(lp)
        ls_all.append(ls)
        total = w_major + w_minor
        if pearson and spearman:
            if weighting:
                heavy = H[i] < Hbar if heavy_when == "low_entropy" else H[i] > Hbar
                ws, wp = (w_major, w_minor) if heavy else (w_minor, w_major)
            else:
                ws = wp = total / 2
        else:
            wp, ws = (total, 0.0) if pearson else (0.0, total)
        per.append(wp * lp * pearson + ws * ls * spearman)
    out = {"loss": ce_weight * n_ce(S, y) + scale * n_mean(per), "ce": n_ce(S, y)}
    if pearson:
        out["pearson"] = n_mean(lp_all)
    if spearman:
        out["spearman"] = n_mean(ls_all)
    return out


def ref_ckd_part(S, Tt, groups, T, standardize=False):
    """standardize: the group differences d_g z-scored before the tempered softmax (logit standardization)."""
    kls = []
    for g in groups:
        half = len(g) // 2
        A, Bg = g[:half], g[half:]
        C = len(S[0])
        ds = [n_mean([S[a][c] for a in A]) - n_mean([S[b][c] for b in Bg]) for c in range(C)]
        dt = [n_mean([Tt[a][c] for a in A]) - n_mean([Tt[b][c] for b in Bg]) for c in range(C)]
        kls.append(n_kl(n_zscore(dt), n_zscore(ds), T) if standardize else n_kl(dt, ds, T))
    return T * T * n_mean(kls)


def ref_ckd(S, Tt, y, groups, T, weight, ce_weight):
    ckd = ref_ckd_part(S, Tt, groups, T)
    return {"loss": ce_weight * n_ce(S, y) + weight * ckd, "ce": n_ce(S, y), "ckd": ckd}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def make(B: int, C: int, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, C, generator=g) * scale
    t = torch.randn(B, C, generator=g) * scale
    y = torch.randint(0, C, (B,), generator=g)
    return s, t, y


def assert_matches(out: dict[str, torch.Tensor], ref: dict[str, float]) -> None:
    for key, expected in ref.items():
        assert key in out, f"missing part {key!r}"
        got = float(out[key])
        assert math.isclose(got, expected, rel_tol=RTOL, abs_tol=ATOL), f"{key}: {got} != {expected}"


# --------------------------------------------------------------------------------------------------
# golden tests
# --------------------------------------------------------------------------------------------------


def test_naive_soft_rank_matches_torchsort_and_tends_to_hard_ranks():
    import torchsort

    x = torch.randn(6, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for strength in (0.05, 0.3, 1.0, 4.0):
        got = torchsort.soft_rank(x, regularization_strength=strength)
        for row_x, row_r in zip(rows(x), rows(got), strict=True):
            assert all(
                math.isclose(a, b, abs_tol=1e-9) for a, b in zip(row_r, n_soft_rank(row_x, strength), strict=True)
            )
    hard = x.argsort(dim=1).argsort(dim=1).double() + 1  # ascending ranks 1..n
    assert torch.allclose(torchsort.soft_rank(x, regularization_strength=1e-6), hard)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strength", [0.1, 1.0, 3.0])
def test_cpu_soft_rank_matches_torchsort_and_naive(dtype, strength):
    """pipeline's CPU soft_rank (numpy argsort + torchsort's isotonic kernels) == torchsort.soft_rank."""
    import torchsort

    from pipeline.losses.functional import soft_rank

    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 12, generator=g, dtype=torch.float64)
    x[0] = 1.0  # all tied
    x[1, :6] = x[1, 6:]  # pairs of ties
    x = x.to(dtype).requires_grad_(True)
    ours, ref = soft_rank(x, "l2", strength), torchsort.soft_rank(x, "l2", strength)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(ours, ref, atol=tol, rtol=tol)
    for row_x, row_r in zip(rows(x), rows(ours), strict=True):
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(row_r, n_soft_rank(row_x, strength), strict=True))
    up = torch.randn(16, 12, generator=g, dtype=torch.float64).to(dtype)
    (g_ours,) = torch.autograd.grad(ours, x, up)
    (g_ref,) = torch.autograd.grad(ref, x, up)
    assert torch.allclose(g_ours, g_ref, atol=tol, rtol=tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda v: soft_rank(v, "l2", strength), (x[2:5].detach().requires_grad_(),))


def test_ce_golden():
    s, t, y = make(8, 6)
    out = build_loss("ce")(s, t, y)
    assert_matches(out, {"loss": n_ce(rows(s), y.tolist()), "ce": n_ce(rows(s), y.tolist())})
    out = build_loss("ce", weight=0.5)(s, t, y)
    assert math.isclose(float(out["loss"]), 0.5 * n_ce(rows(s), y.tolist()), rel_tol=RTOL)


@pytest.mark.parametrize("B,C,T", SHAPES_T)
def test_kd_golden(B, C, T):
    s, t, y = make(B, C, seed=B + C)
    out = build_loss("kd", T=T, a=0.3, b=0.7)(s, t, y)
    assert_matches(out, ref_kd(rows(s), rows(t), y.tolist(), T, 0.3, 0.7))


@pytest.mark.parametrize("B,C,T", SHAPES_T)
@pytest.mark.parametrize("epoch", [0.0, 5.5, 40.0])
def test_dkd_golden(B, C, T, epoch):
    s, t, y = make(B, C, seed=B * C)
    loss = build_loss("dkd", alpha=1.5, beta=8.0, T=T, warmup=20, ce_weight=0.9)
    out = loss(s, t, y, epoch=epoch)
    assert_matches(out, ref_dkd(rows(s), rows(t), y.tolist(), T, 1.5, 8.0, 20.0, epoch, 0.9))


def test_dkd_matches_reference_code_formulation():
    """mdistiller's dkd_loss (log of the summed binary probabilities, NCKD mask by -1000 * one_hot)."""
    B, C, T = 16, 10, 4.0
    s, t, y = make(B, C, seed=3)
    S, Tt = rows(s), rows(t)
    tckd = nckd = 0.0
    for i in range(B):
        ps, pt = n_softmax(S[i], T), n_softmax(Tt[i], T)
        bs = [ps[y[i]], sum(ps) - ps[y[i]]]
        bt = [pt[y[i]], sum(pt) - pt[y[i]]]
        tckd += sum(b * (math.log(b) - math.log(a)) for a, b in zip(bs, bt, strict=True))
        ms = [v / T - (1000.0 if c == y[i] else 0.0) for c, v in enumerate(S[i])]
        mt = [v / T - (1000.0 if c == y[i] else 0.0) for c, v in enumerate(Tt[i])]
        nckd += n_kl(mt, ms, 1.0)
    out = build_loss("dkd", warmup=0)(s, t, y, epoch=0)
    assert math.isclose(float(out["tckd"]), T * T * tckd / B, rel_tol=RTOL)
    assert math.isclose(float(out["nckd"]), T * T * nckd / B, rel_tol=RTOL)


@pytest.mark.parametrize("B,C,T", [*SHAPES_T, (1, 10, 4.0)])
def test_dist_golden(B, C, T):
    s, t, y = make(B, C, seed=B + 2 * C)
    out = build_loss("dist", beta=1.0, gamma=2.0, T=T, w=2.0, ce_weight=0.7)(s, t, y)
    assert_matches(out, ref_dist(rows(s), rows(t), y.tolist(), T, 1.0, 2.0, 2.0, 0.7))


CMKD_CONFIGS = [
    {},
    {"spearman_heavy_when": "high_entropy", "w_major": 0.8, "w_minor": 0.1},
    {"entropy_weighting": False},
    {"use_spearman": False, "entropy_weighting": False},
    {"use_spearman": False, "entropy_weighting": False, "use_zscore": False},
    {"use_pearson": False, "entropy_weighting": False, "regularization_strength": 0.1},
]


@pytest.mark.parametrize("B,C,T", SHAPES_T)
@pytest.mark.parametrize("config", CMKD_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_cmkd_golden(B, C, T, config):
    s, t, y = make(B, C, seed=B + 3 * C)
    params = {
        "T": T,
        "scale": 3.0,
        "regularization_strength": 1.0,
        "w_major": 0.7,
        "w_minor": 0.3,
        "spearman_heavy_when": "low_entropy",
        "ce_weight": 0.8,
    } | config
    out = build_loss("cmkd", **params)(s, t, y)
    ref = ref_cmkd(
        rows(s),
        rows(t),
        y.tolist(),
        T=params["T"],
        scale=params["scale"],
        strength=params["regularization_strength"],
        w_major=params["w_major"],
        w_minor=params["w_minor"],
        heavy_when=params["spearman_heavy_when"],
        pearson=params.get("use_pearson", True),
        spearman=params.get("use_spearman", True),
        use_z=params.get("use_zscore", True),
        weighting=params.get("entropy_weighting", True),
        ce_weight=params["ce_weight"],
    )
    assert_matches(out, ref)
    assert set(out) == set(ref)


@pytest.mark.parametrize("B,C,T", SHAPES_T)
@pytest.mark.parametrize("k", [2, 4])
def test_ckd_golden_explicit_groups(B, C, T, k):
    if k > B:
        pytest.skip("batch smaller than a group")
    s, t, y = make(B, C, seed=B + 5 * C)
    g = torch.Generator().manual_seed(B)
    groups = torch.stack([torch.randperm(B, generator=g)[:k] for _ in range(11)])
    out = build_loss("ckd", T=T, weight=0.6, ce_weight=0.4)(s, t, y, groups=groups)
    assert_matches(out, ref_ckd(rows(s), rows(t), y.tolist(), groups.tolist(), T, 0.6, 0.4))


def test_ckd_golden_sampled_groups_are_seeded():
    s, t, y = make(12, 7, seed=9)
    groups = build_loss("ckd", seed=5, groups_per_step=20).sample_groups(12)
    assert groups.shape == (20, 2)
    assert all(a != b for a, b in groups.tolist())  # distinct rows in a group
    out = build_loss("ckd", seed=5, groups_per_step=20)(s, t, y)
    assert_matches(out, ref_ckd(rows(s), rows(t), y.tolist(), groups.tolist(), 4.0, 1.0, 1.0))
    other = build_loss("ckd", seed=6, groups_per_step=20)(s, t, y)
    assert not torch.equal(other["ckd"], out["ckd"])
    distinct = len({(a, b) for a, b in groups.tolist()})
    assert float(out["groups"]) == distinct


def test_combined_golden_counts_ce_once():
    B, C, T = 16, 10, 4.0
    s, t, y = make(B, C, seed=11)
    S, Tt, Y = rows(s), rows(t), y.tolist()
    loss = build_loss(
        "dkd+cmkd",
        dkd={"T": T, "beta": 8.0, "warmup": 10, "ce_weight": 5.0},  # component CE weight ignored
        cmkd={"scale": 2.0},
        weights={"dkd": 0.5, "cmkd": 2.0, "ce": 0.3},
    )
    assert isinstance(loss, CombinedLoss)
    out = loss(s, t, y, epoch=5)
    dkd = ref_dkd(S, Tt, Y, T, 1.0, 8.0, 10.0, 5.0, 0.0)["loss"]
    cmkd = ref_cmkd(
        S, Tt, Y, T=4.0, scale=2.0, strength=1.0, w_major=0.7, w_minor=0.3, heavy_when="high_entropy", ce_weight=0.0
    )["loss"]
    assert_matches(out, {"loss": 0.3 * n_ce(S, Y) + 0.5 * dkd + 2.0 * cmkd, "ce": n_ce(S, Y), "dkd": dkd, "cmkd": cmkd})
    assert {"dkd/tckd", "dkd/nckd", "dkd/warmup", "cmkd/pearson", "cmkd/spearman"} <= set(out)


def test_combined_default_weights_and_groups_routing():
    s, t, y = make(8, 5, seed=2)
    groups = torch.tensor([[0, 1], [2, 3], [4, 5]])
    out = build_loss("kd+ckd")(s, t, y, groups=groups)
    S, Tt, Y = rows(s), rows(t), y.tolist()
    expected = n_ce(S, Y) + 0.9 * ref_kd(S, Tt, Y, 4.0, 0.1, 0.9)["kd"] + ref_ckd_part(S, Tt, groups.tolist(), 4.0)
    assert math.isclose(float(out["loss"]), expected, rel_tol=RTOL)
    with pytest.raises(ValueError, match="groups"):
        build_loss("kd+dist")(s, t, y, groups=groups)


# --------------------------------------------------------------------------------------------------
# behaviour
# --------------------------------------------------------------------------------------------------

ALL = sorted(LOSSES)


@pytest.mark.parametrize("name", ALL)
def test_output_contract(name):
    s, t, y = make(8, 10)
    s.requires_grad_(True)
    t.requires_grad_(True)
    out = build_loss(name)(s, t, y, epoch=3.0)
    assert "loss" in out and "ce" in out
    assert all(v.dim() == 0 for v in out.values())
    assert out["loss"].requires_grad and not any(v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    assert t.grad is None, "teacher logits must never receive gradients"
    assert s.grad is not None and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_float32(name, dtype):
    s, t, y = make(8, 10)
    out = build_loss(name)(s.to(dtype), t.to(dtype), y, epoch=30)
    ref = build_loss(name)(s.to(dtype).float(), t.to(dtype).float(), y, epoch=30)
    assert out["loss"].dtype == torch.float32
    assert torch.allclose(out["loss"], ref["loss"])


def test_dist_batch_of_one_drops_intra_with_the_reference_gradient():
    s, t, y = make(1, 10, seed=4)
    s.requires_grad_(True)
    out = build_loss("dist")(s, t, y)
    assert float(out["intra"]) == 0.0
    out["loss"].backward()
    ours = s.grad.clone()

    # the reference formula (pearson over a batch of one = 0 / (0 + eps) -> intra = 1, a constant)
    s.grad = None
    p_s, p_t = (s / 4).softmax(1), (t / 4).softmax(1)

    def pc(a, b, dim):
        a, b = a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True)
        return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + 1e-8)

    relation = (1 - pc(p_s, p_t, 1).mean()) + (1 - pc(p_s, p_t, 0).mean())
    ref = torch.nn.functional.cross_entropy(s, y) + 2 * 16 * relation
    ref.backward()
    assert torch.allclose(ours, s.grad, atol=1e-6)
    # only the constant differs
    assert math.isclose(float(ref.detach()) - float(out["loss"].detach()), 2 * 16 * 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("name", ["dist", "cmkd"])
def test_constant_student_rows_get_no_correlation_gradient(name):
    """A constant student row (e.g. a zero-initialised head) has no defined correlation/z-score direction:
    the correlation parts take their constant-vector value (1 - 0) with zero gradient, not ~1e7-1e15."""
    _, t, y = make(6, 10)
    for value in (0.0, 0.1, 3.0):
        s = torch.full((6, 10), value, requires_grad=True)
        out = build_loss(name, ce_weight=0.0)(s, t, y)
        parts = ("inter", "intra") if name == "dist" else ("pearson", "spearman")
        assert all(float(out[p]) == 1.0 for p in parts)
        out["loss"].backward()
        assert torch.equal(s.grad, torch.zeros_like(s))


def test_dkd_warmup_ramp():
    s, t, y = make(4, 5)
    loss = build_loss("dkd", warmup=10)
    assert [float(loss(s, t, y, epoch=e)["warmup"]) for e in (0, 2.5, 10, 50)] == [0.0, 0.25, 1.0, 1.0]
    assert float(build_loss("dkd", warmup=0)(s, t, y, epoch=0)["warmup"]) == 1.0


def test_ckd_small_batch_state_dict_and_group_validation():
    s, t, y = make(1, 5)
    out = build_loss("ckd")(s, t, y)
    assert float(out["ckd"]) == 0.0 and float(out["groups"]) == 0.0
    assert torch.allclose(out["loss"], out["ce"])

    a = build_loss("ckd", seed=3, groups_per_step=4)
    a.sample_groups(10)
    state = a.state_dict()
    expected = a.sample_groups(10)
    b = build_loss("ckd", seed=99, groups_per_step=4)
    b.load_state_dict(state)
    assert torch.equal(b.sample_groups(10), expected), "resumed sampler must continue the same stream"

    s, t, y = make(6, 5)
    loss = build_loss("ckd")
    for bad in (torch.tensor([[0, 1, 2]]), torch.tensor([0, 1]), torch.tensor([[0, 6]]), torch.tensor([[0.0, 1.0]])):
        with pytest.raises(ValueError):
            loss(s, t, y, groups=bad)
    pairs = torch.tensor([[0, 1], [0, 1], [1, 0], [2, 3]])
    assert float(loss(s, t, y, groups=pairs)["groups"]) == 3.0
    quads = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1]])  # first two are the same comparison
    assert float(loss(s, t, y, groups=quads)["groups"]) == 2.0


def test_cmkd_entropy_direction_changes_weights():
    s, t, y = make(16, 10, seed=8)
    t = t * torch.linspace(0.1, 5, 16)[:, None]  # spread of teacher confidence
    low = build_loss("cmkd", spearman_heavy_when="low_entropy")
    high = build_loss("cmkd", spearman_heavy_when="high_entropy")
    wp_low, ws_low = low.part_weights(t)
    wp_high, ws_high = high.part_weights(t)
    assert torch.allclose(wp_low + ws_low, torch.ones(16)) and torch.allclose(wp_high + ws_high, torch.ones(16))
    confident = t.softmax(1).max(1).values > 0.9  # low entropy rows
    assert (ws_low[confident] == 0.7).all() and (ws_high[confident] == 0.3).all()
    assert not torch.equal(low(s, t, y)["loss"], high(s, t, y)["loss"])


def test_default_hyperparameters():
    assert build_loss("kd").hparams() == {"T": 4.0, "a": 0.1, "b": 0.9, "standardize": False}
    dkd = {"alpha": 1.0, "beta": 8.0, "T": 4.0, "warmup": 20.0, "ce_weight": 1.0, "standardize": False}
    assert build_loss("dkd").hparams() == dkd
    assert build_loss("dist").hparams() == {"beta": 1.0, "gamma": 1.0, "T": 4.0, "w": 2.0, "ce_weight": 1.0}
    cmkd = build_loss("cmkd").hparams()
    assert (cmkd["T"], cmkd["scale"], cmkd["regularization"], cmkd["regularization_strength"]) == (4.0, 4.0, "l2", 1.0)
    assert cmkd["spearman_heavy_when"] == "high_entropy"  # chosen by benchmarks/ablation_cmkd.py
    assert all(cmkd[k] for k in ("use_pearson", "use_spearman", "use_zscore", "entropy_weighting"))
    ckd = build_loss("ckd").hparams()
    assert (ckd["T"], ckd["group_size"], ckd["groups_per_step"]) == (4.0, 2, 128)


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


def test_unknown_loss_name_lists_available():
    with pytest.raises(ValueError) as err:
        build_loss("kdd")
    assert str(err.value) == (
        "unknown loss 'kdd'; available: ['ce', 'ckd', 'cmkd', 'dist', 'dkd', 'kd', 'lskd', 'mtkd']"
    )
    with pytest.raises(ValueError, match="unknown loss 'dkdd'"):
        build_loss("dkdd+cmkd")


@pytest.mark.parametrize("exc", [TypeError, ValueError])
def test_unknown_parameter_lists_valid_ones(exc):
    with pytest.raises(exc) as err:
        build_loss("kd", T=4, temprature=2)
    assert "temprature" in str(err.value) and "['T', 'a', 'b', 'label_smoothing', 'standardize']" in str(err.value)
    with pytest.raises(exc, match="ce_weight"):
        build_loss("ckd", sed=1)


def test_invalid_values_and_combinations():
    bad = [
        ("kd", {"T": 0}),
        ("kd", {"T": True}),
        ("ckd", {"group_size": 3}),
        ("cmkd", {"spearman_heavy_when": "sometimes"}),
        ("cmkd", {"regularization": "l1"}),
        ("cmkd", {"use_spearman": False}),  # entropy weighting needs both parts
        ("cmkd", {"use_pearson": False, "use_spearman": False, "entropy_weighting": False}),
        ("dkd+cmkd", {"dkd": {"bta": 1}}),
        ("dkd+cmkd", {"kd": {}}),
        ("dkd+cmkd", {"weights": {"dist": 1.0}}),
        ("dkd+cmkd", {"weights": {"dkd": -1.0}}),
    ]
    for name, params in bad:
        with pytest.raises((TypeError, ValueError)):
            build_loss(name, **params)
    with pytest.raises(LossConfigError, match=r"valid parameters: \['cmkd', 'dkd', 'label_smoothing', 'weights'\]"):
        build_loss("dkd+cmkd", dist={})
    with pytest.raises(ValueError, match="'ce' cannot be a component"):
        build_loss("ce+kd")
    with pytest.raises(ValueError, match="repeats"):
        build_loss("kd+kd")


def test_dkd_requires_epoch():
    s, t, y = make(4, 5)
    with pytest.raises(ValueError, match="epoch"):
        build_loss("dkd")(s, t, y)
    with pytest.raises(ValueError, match="epoch"):
        build_loss("dkd+cmkd")(s, t, y)


def test_bad_input_shapes():
    s, t, y = make(4, 5)
    loss = build_loss("kd")
    with pytest.raises(ValueError):
        loss(s, t[:, :4], y)
    with pytest.raises(ValueError):
        loss(s[0], t[0], y[:1])
    with pytest.raises(ValueError):
        loss(s, t, y.float())


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("cmkd", {}),
        ("cmkd", {"spearman_heavy_when": "low_entropy"}),
        ("cmkd", {"entropy_weighting": False}),
        ("cmkd", {"use_spearman": False, "entropy_weighting": False}),
        ("cmkd", {"use_pearson": False, "entropy_weighting": False, "use_zscore": False}),
        ("dkd+cmkd", {}),
        ("kd", {}),
    ],
)
def test_precomputed_teacher_features_give_the_same_loss_and_gradient(name, params):
    """forward(..., teacher_features=loss.teacher_features(t)) == forward(...) bit for bit (the loader's path)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(12, 7, generator=g, requires_grad=True)
    t = 3 * torch.randn(12, 7, generator=g)
    y = torch.randint(0, 7, (12,), generator=g)
    loss = build_loss(name, **params)
    feats = loss.teacher_features(t)
    assert sorted(feats) == sorted(loss.feature_names)
    assert all(v.shape[0] == 12 for v in feats.values())
    a = loss(s, t, y, epoch=1.0)
    b = loss(s, t, y, epoch=1.0, teacher_features=feats)
    (ga,) = torch.autograd.grad(a["loss"], s)
    (gb,) = torch.autograd.grad(b["loss"], s)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(ga, gb)
    if feats:  # wrong features are errors, not silent garbage
        with pytest.raises(ValueError, match="lack"):
            loss(s, t, y, epoch=1.0, teacher_features={})
        with pytest.raises(ValueError, match="rows"):
            loss(s, t, y, epoch=1.0, teacher_features={k: v[:5] for k, v in feats.items()})


# --------------------------------------------------------------------------------------------------
# logit standardization (Sun et al., CVPR 2024) and multi-teacher KD (issue 15)
# --------------------------------------------------------------------------------------------------


def ref_dkd_std(S, Tt, y, T, alpha, beta, warmup, epoch, ce_weight):
    """DKD on z-scored rows; CE stays on the raw student logits."""
    ref = ref_dkd([n_zscore(s) for s in S], [n_zscore(t) for t in Tt], y, T, alpha, beta, warmup, epoch, 0.0)
    ref["ce"] = n_ce(S, y)
    ref["loss"] += ce_weight * ref["ce"]
    return ref


def ref_mtkd(S, M, y, T, a, b, weighting, standardize):
    """M[i][m] = member m's logits of sample i; weights per CA-MKD (confidence) or 1/M (mean)."""
    per = []
    for s, ms, yi in zip(S, M, y, strict=True):
        k = len(ms)
        if weighting == "mean" or k == 1:
            w = [1.0 / k] * k
        else:
            ce = [-n_log_softmax(z)[yi] for z in ms]
            soft = n_softmax(ce)
            w = [(1 - q) / (k - 1) for q in soft]
        zs = n_zscore(s) if standardize else s
        per.append(sum(wm * n_kl(n_zscore(z) if standardize else z, zs, T) for wm, z in zip(w, ms, strict=True)))
    kd = T * T * n_mean(per)
    return {"loss": a * n_ce(S, y) + b * kd, "ce": n_ce(S, y), "kd": kd}


@pytest.mark.parametrize("B,C,T", SHAPES_T)
def test_kd_standardized_golden(B, C, T):
    s, t, y = make(B, C, seed=B + 7 * C)
    out = build_loss("kd", T=T, a=0.3, b=0.7, standardize=True)(s, t, y)
    S, Tt = rows(s), rows(t)
    ref = ref_kd([n_zscore(r) for r in S], [n_zscore(r) for r in Tt], y.tolist(), T, 0.0, 0.7)
    assert_matches(out, {"loss": 0.3 * n_ce(S, y.tolist()) + ref["loss"], "ce": n_ce(S, y.tolist()), "kd": ref["kd"]})


@pytest.mark.parametrize("B,C,T", SHAPES_T)
def test_dkd_standardized_golden(B, C, T):
    s, t, y = make(B, C, seed=B * C + 1)
    out = build_loss("dkd", alpha=9.0, beta=72.0, T=T, warmup=20, ce_weight=0.9, standardize=True)(s, t, y, epoch=5.5)
    assert_matches(out, ref_dkd_std(rows(s), rows(t), y.tolist(), T, 9.0, 72.0, 20.0, 5.5, 0.9))


@pytest.mark.parametrize("B,C,T", SHAPES_T)
@pytest.mark.parametrize("k", [2, 4])
def test_ckd_standardized_golden(B, C, T, k):
    if k > B:
        pytest.skip("batch smaller than a group")
    s, t, y = make(B, C, seed=B + 11 * C)
    g = torch.Generator().manual_seed(B + k)
    groups = torch.stack([torch.randperm(B, generator=g)[:k] for _ in range(9)])
    out = build_loss("ckd", T=T, weight=0.6, ce_weight=0.4, standardize=True)(s, t, y, groups=groups)
    ckd = ref_ckd_part(rows(s), rows(t), groups.tolist(), T, standardize=True)
    assert_matches(out, {"loss": 0.4 * n_ce(rows(s), y.tolist()) + 0.6 * ckd, "ckd": ckd})


@pytest.mark.parametrize("B,C,T", SHAPES_T)
def test_lskd_golden_with_the_papers_defaults(B, C, T):
    """lskd = kd on z-scored logits, defaults from the official recipe (base temperature 2, KD weight 9, CE 0.1)."""
    s, t, y = make(B, C, seed=B + 13 * C)
    assert build_loss("lskd").hparams() == {"T": 2.0, "a": 0.1, "b": 9.0}
    S, Tt, Y = rows(s), rows(t), y.tolist()
    ref = ref_kd([n_zscore(r) for r in S], [n_zscore(r) for r in Tt], Y, 2.0, 0.0, 9.0)
    assert_matches(build_loss("lskd")(s, t, y), {"loss": 0.1 * n_ce(S, Y) + ref["loss"], "kd": ref["kd"]})
    ref = ref_kd([n_zscore(r) for r in S], [n_zscore(r) for r in Tt], Y, T, 0.0, 0.5)
    assert_matches(build_loss("lskd", T=T, a=0.2, b=0.5)(s, t, y), {"loss": 0.2 * n_ce(S, Y) + ref["loss"]})


@pytest.mark.parametrize("name", ["kd", "lskd", "dkd", "ckd"])
def test_standardized_losses_ignore_each_rows_logit_scale(name):
    """The point of standardization: a student whose logits are the teacher's times any positive per-row scale
    plus a shift has the same standardized loss as one equal to the teacher (the distillation term is 0)."""
    s, t, y = make(12, 10, seed=5)
    t = t.double()
    scale = torch.rand(12, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 5 + 0.2
    params = {} if name == "lskd" else {"standardize": True}
    if name == "ckd":  # differences of scaled rows are not a scaled difference: one scale for the whole batch
        scale = scale[:1].expand(12, 1)
    groups = (
        {
            "groups": torch.tensor(
                [
                    [0, 1],
                    [2, 3],
                    [
                        4,
                        5,
                    ],
                    [6, 7],
                ]
            )
        }
        if name == "ckd"
        else {}
    )
    out = build_loss(name, **params)(t * scale + 3.0, t, y, epoch=50.0, **groups)
    parts = {"kd": ["kd"], "lskd": ["kd"], "dkd": ["tckd", "nckd"], "ckd": ["ckd"]}[name]
    assert all(abs(float(out[p])) < 1e-10 for p in parts), {p: float(out[p]) for p in parts}
    plain = build_loss(name, **({"T": 2.0} if name == "lskd" else {}))
    if name != "lskd":  # without standardization the scale mismatch is a loss
        assert float(plain(t * scale + 3.0, t, y, epoch=50.0, **groups)[parts[0]]) > 1e-3


@pytest.mark.parametrize("B,C,M,T", [(4, 5, 2, 1.0), (7, 3, 3, 2.5), (16, 10, 2, 4.0), (9, 100, 4, 4.0)])
@pytest.mark.parametrize("weighting", ["mean", "confidence"])
@pytest.mark.parametrize("standardize", [False, True])
def test_mtkd_golden(B, C, M, T, weighting, standardize):
    s, t, y = make(B, C, seed=B + C + M)
    members = torch.randn(B, M, C, generator=torch.Generator().manual_seed(M)) * 3
    loss = build_loss("mtkd", T=T, a=0.2, b=0.8, weighting=weighting, standardize=standardize)
    out = loss(s, t, y, members=members)
    ref = ref_mtkd(rows(s), members.double().tolist(), y.tolist(), T, 0.2, 0.8, weighting, standardize)
    assert_matches(out, ref)
    assert float(out["teachers"]) == M
    w = loss.member_weights(members, y)
    assert torch.allclose(w.sum(1), torch.ones(B))  # weights of a sample sum to one over the members


def test_mtkd_confidence_prefers_the_member_closer_to_the_label():
    _, _, y = make(6, 5, seed=3)
    good = 8.0 * torch.nn.functional.one_hot(y, 5).float()  # confident and right
    bad = 8.0 * torch.nn.functional.one_hot((y + 1) % 5, 5).float()  # confident and wrong
    w = build_loss("mtkd", weighting="confidence").member_weights(torch.stack([bad, good], 1), y)
    assert (w[:, 1] > 0.99).all() and (w[:, 0] < 0.01).all()


@pytest.mark.parametrize("params", [{}, {"standardize": True, "T": 2.0}, {"weighting": "confidence"}])
def test_mtkd_on_a_single_teacher_is_kd(params):
    """Without members (a single teacher's store) the teacher is the one member: the same loss and gradient as kd."""
    s, t, y = make(16, 10, seed=4)
    s.requires_grad_(True)
    kd_params = {k: v for k, v in params.items() if k != "weighting"}
    a, b = build_loss("mtkd", **params)(s, t, y), build_loss("kd", **kd_params)(s, t, y)
    (ga,) = torch.autograd.grad(a["loss"], s)
    (gb,) = torch.autograd.grad(b["loss"], s)
    assert torch.allclose(a["loss"], b["loss"], rtol=1e-6) and torch.allclose(ga, gb, rtol=1e-5, atol=1e-8)
    same = build_loss("mtkd", **params)(s, t, y, members=t[:, None, :])
    assert torch.allclose(same["loss"], a["loss"], rtol=1e-6)


def test_one_call_contract_and_inputs_a_loss_cannot_use():
    """Every loss takes forward(s, t, y, epoch=, groups=, teacher_features=, members=); an input given to a loss
    that cannot use it is an error naming it (never silently dropped); a combination hands each component all."""
    s, t, y = make(8, 6, seed=6)
    members = torch.randn(8, 3, 6, generator=torch.Generator().manual_seed(0))
    groups = torch.tensor([[0, 1], [2, 3], [4, 5]])
    for name in ALL:
        out = build_loss(name)(s, t, y, epoch=2.0, groups=None, teacher_features=None, members=None)
        assert "loss" in out
    with pytest.raises(ValueError, match=r"'kd' cannot use \['members'\]"):
        build_loss("kd")(s, t, y, members=members)
    with pytest.raises(ValueError, match=r"'mtkd' cannot use \['groups'\]"):
        build_loss("mtkd")(s, t, y, groups=groups)
    with pytest.raises(ValueError, match=r"cannot use \['teacher_features'\]"):
        build_loss("kd")(s, t, y, teacher_features={"q": t})
    with pytest.raises(ValueError, match=r"'kd\+dist' cannot use \['groups', 'members'\]"):
        build_loss("kd+dist")(s, t, y, groups=groups, members=members)
    with pytest.raises(ValueError, match=r"members must be \(B, M, C\)"):
        build_loss("mtkd")(s, t, y, members=members[:, :, :5])
    S, Tt, Y = rows(s), rows(t), y.tolist()
    out = build_loss("mtkd+ckd")(s, t, y, groups=groups, members=members)
    mt = ref_mtkd(S, members.double().tolist(), Y, 4.0, 0.0, 1.0, "mean", False)["kd"]
    expected = n_ce(S, Y) + 0.9 * mt + ref_ckd_part(S, Tt, groups.tolist(), 4.0)
    assert math.isclose(float(out["loss"]), expected, rel_tol=RTOL)
    assert float(out["mtkd/teachers"]) == 3.0
