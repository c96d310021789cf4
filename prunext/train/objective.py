"""The training loss, ``--loss {lm,kd,lm+kd}``: next-token LM loss, logit distillation, or both.

``kd`` distils from a teacher (by default the unpruned model the student was
pruned or extended from) run on the fly on the same batch: per next-token
position, ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged
over the positions the LM loss scores (all but the last of each block). The
teacher is a second DeepSpeed engine with the student's ZeRO-3 config and no
optimizer, so it is sharded over the ranks like the student and never updated.
``lm+kd`` adds the two: ``lm + --kd-weight * kd``.

``--hidden-weight W`` adds a hidden-state term to either: the mean over the
student's positions of ``|s_p - t_q|^2 / |t_q|^2`` (every token but each
block's first, where the massive activations sit), ``s_p`` the output of
position p and ``t_q`` the teacher's state after block q, the block at the same
depth (:func:`prunext.prune.reconstruct.targets`: the same index when the
depth was kept; after a run of dropped blocks, the state before the next kept
one). The last position is compared after the final norm, as transformers
returns it.
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


def hidden_loss(student_states, teacher_states, targets: list[int]) -> torch.Tensor:
    """Mean over positions p of the relative squared error between student state p+1 and teacher state targets[p]+1.

    Args:
        student_states: ``output_hidden_states`` of the student: the embeddings, then each position's output.
        teacher_states: the same of the teacher.
        targets: per student position, the teacher block at the same depth.
    """
    from prunext.prune.reconstruct import relative_error

    total = sum(relative_error(student_states[p + 1], teacher_states[q + 1]) for p, q in enumerate(targets))
    return total / len(targets)


class Objective:
    """``objective(engine, input_ids) -> (loss to backpropagate, {"lm": ..., "kd": ...} detached parts)``.

    Args:
        kind: one of :data:`LOSSES`.
        teacher: a callable model/engine returning ``.logits`` (needed for ``kd`` and ``lm+kd``).
        kd_weight: weight of the kd term in ``lm+kd``.
        temperature: distillation temperature T.
        hidden_weight: weight of the hidden-state term (0: off).
        targets: per student position, the teacher block at the same depth (needed when ``hidden_weight``).
    """

    def __init__(self, kind: str = "lm", teacher=None, kd_weight: float = 1.0, temperature: float = 1.0,
                 hidden_weight: float = 0.0, targets: list[int] | None = None) -> None:  # fmt: skip
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; known: {', '.join(LOSSES)}")
        if kind != "lm" and teacher is None:
            raise ValueError(f"--loss {kind} needs a teacher")
        if hidden_weight and (kind == "lm" or targets is None):
            raise ValueError("a hidden-state term needs a teacher and the depth targets")
        self.kind, self.teacher, self.kd_weight, self.temperature = kind, teacher, kd_weight, temperature
        self.hidden_weight, self.targets = hidden_weight, targets

    def __call__(self, engine, input_ids: torch.LongTensor) -> tuple[torch.Tensor, dict[str, float]]:
        states = bool(self.hidden_weight)
        out = engine(input_ids=input_ids, labels=input_ids, use_cache=False, output_hidden_states=states)
        if self.kind == "lm":
            return out.loss, {}
        import torch

        with torch.no_grad():
            teacher = self.teacher(input_ids=input_ids, use_cache=False, output_hidden_states=states)
        kd = kd_loss(out.logits, teacher.logits, self.temperature)
        parts = {"lm": out.loss.detach().float().item(), "kd": kd.detach().float().item()}
        loss = kd if self.kind == "kd" else out.loss + self.kd_weight * kd
        if states:
            hidden = hidden_loss(out.hidden_states, teacher.hidden_states, self.targets)
            parts["hidden"] = hidden.detach().float().item()
            loss = loss + self.hidden_weight * hidden
        return loss, parts
