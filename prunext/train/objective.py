"""The training loss, ``--loss {lm,kd,lm+kd}``: next-token LM loss, logit distillation, or both.

``kd`` distils from a teacher (by default the unpruned model the student was
pruned or extended from) run on the fly on the same batch: per next-token
position, ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged
over the positions the LM loss scores (all but the last of each block). The
teacher is a second DeepSpeed engine with the student's ZeRO-3 config and no
optimizer, so it is sharded over the ranks like the student and never updated.
``lm+kd`` adds the two: ``lm + --kd-weight * kd``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # kept out of module import so `prunext train --help` stays fast
    import torch

LOSSES = ("lm", "kd", "lm+kd")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over next-token positions of ``T^2 * KL(p_teacher || p_student)``, computed in fp32.

    Args:
        student_logits: (batch, seq, vocab).
        teacher_logits: (batch, seq, vocab), same shape.
        temperature: T > 0.
    """
    import torch.nn.functional as F

    s = student_logits[:, :-1].float() / temperature  # (b, seq-1, vocab): the positions the LM loss scores
    t = teacher_logits[:, :-1].float() / temperature
    log_pt = F.log_softmax(t, dim=-1)
    kl = (log_pt.exp() * (log_pt - F.log_softmax(s, dim=-1))).sum(-1)  # (b, seq-1)
    return kl.mean() * temperature**2


class Objective:
    """``objective(engine, input_ids) -> (loss to backpropagate, {"lm": ..., "kd": ...} detached parts)``.

    Args:
        kind: one of :data:`LOSSES`.
        teacher: a callable model/engine returning ``.logits`` (needed for ``kd`` and ``lm+kd``).
        kd_weight: weight of the kd term in ``lm+kd``.
        temperature: distillation temperature T.
    """

    def __init__(self, kind: str = "lm", teacher=None, kd_weight: float = 1.0, temperature: float = 1.0) -> None:
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; known: {', '.join(LOSSES)}")
        if kind != "lm" and teacher is None:
            raise ValueError(f"--loss {kind} needs a teacher")
        self.kind, self.teacher, self.kd_weight, self.temperature = kind, teacher, kd_weight, temperature

    def __call__(self, engine, input_ids: torch.LongTensor) -> tuple[torch.Tensor, dict[str, float]]:
        out = engine(input_ids=input_ids, labels=input_ids, use_cache=False)
        if self.kind == "lm":
            return out.loss, {}
        import torch

        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids, use_cache=False).logits
        kd = kd_loss(out.logits, teacher_logits, self.temperature)
        parts = {"lm": out.loss.detach().float().item(), "kd": kd.detach().float().item()}
        return (kd if self.kind == "kd" else out.loss + self.kd_weight * kd), parts
