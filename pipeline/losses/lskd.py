"""Logit-standardized KD (Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge Distillation",
CVPR 2024, arXiv:2403.01427)."""

from __future__ import annotations

from .kd import KDLoss

__all__ = ["LSKDLoss"]


class LSKDLoss(KDLoss):
    """KD on z-scored logits: ``loss = a * CE + b * T^2 * mean_i KL(softmax(zs(t_i)/T) || softmax(zs(s_i)/T))``.

    ``zs(z) = (z - mean(z)) / (std(z) + 1e-7)`` per sample (unbiased std), the paper's Z-score
    pre-process (the official code's ``normalize``). Dividing by ``std(z)`` makes the effective
    temperature of every sample ``T * std(z)``: the paper's "temperature as the weighted standard
    deviation of the logit", different for teacher and student and across samples, so the student no
    longer has to match the teacher's logit magnitude, only its logit relations. ``T`` is the paper's
    "base temperature".

    Defaults: the official CIFAR-100 recipe for "KD + Ours" (github.com/sunshangquan/logit-standardization-KD,
    README and ``tools/train.py``: ``--logit-stand --base-temp 2 --kd-weight 9`` on mdistiller's KD config,
    whose CE weight is 0.1): T = 2, b = 9, a = 0.1. The README's logs use base temperature 3 for a few
    teacher/student pairs (e.g. VGG13 -> VGG8). The same is ``kd`` with ``standardize: true`` and these values.

    Args:
        T: base temperature (> 0).
        a: weight of the cross-entropy term.
        b: weight of the distillation term.
    """

    name = "lskd"

    def __init__(self, T: float = 2.0, a: float = 0.1, b: float = 9.0) -> None:
        super().__init__(T=T, a=a, b=b, standardize=True)

    def hparams(self) -> dict[str, object]:
        return {"T": self.T, "a": self.ce_weight, "b": self.b}
