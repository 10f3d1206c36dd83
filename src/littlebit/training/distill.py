"""The distillation loss: KL to the teacher's next-token distribution plus hidden-state matching.

Two forms:

- ``paper``: KL(teacher || student) averaged over tokens, plus 10 x the *sum* over decoder layers
  of the element-wise MSE between hidden states (LITTLEBIT.md section 3).
- ``normalized`` (default): the same per-token KL, plus ``hidden_weight`` x the *mean* over layers
  of each layer's relative squared error ``|h_s - h_t|^2 / |h_t|^2``.

Why the default differs: the residual stream's norm grows through the depth and a few channels
carry very large activations, so the paper's summed MSE is dominated by the last layers and is
two orders of magnitude larger than the KL on our proxy; the KL, which is what perplexity
measures, then hardly steers training. The relative error is scale-free per layer, so every layer
counts about the same, and with weight 1 the two terms start at comparable sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from littlebit.config import LittleBitError
from littlebit.training.config import DistillConfig


def kl_per_token(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student), computed in fp32 whatever the logits' dtype."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, v).float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="sum") / s.shape[0]
    # T^2 keeps the gradient's size independent of the temperature (Hinton et al.).
    return kl * temperature**2


Reduce = Callable[[torch.Tensor], torch.Tensor]


def hidden_error(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    form: str,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """Summed MSE (``paper``) or mean relative squared error (``normalized``) over layers.

    ``reduce`` (a sharded run) averages the relative error's denominators over the ranks, each of
    which holds an equal share of the batch: the error is then the whole batch's, not a mean of ratios.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise LittleBitError(f"{len(student_hidden)} student vs {len(teacher_hidden)} teacher hidden states")
    if not student_hidden:
        raise LittleBitError("no hidden states to compare")
    dens = None
    if form != "paper" and reduce is not None:  # one collective for all layers
        dens = reduce(torch.stack([t.float().detach().square().sum() for t in teacher_hidden]))
    terms = []
    for i, (s, t) in enumerate(zip(student_hidden, teacher_hidden, strict=True)):
        s, t = s.float(), t.float().detach()
        if form == "paper":
            terms.append(F.mse_loss(s, t))
        else:
            den = t.square().sum() if dens is None else dens[i]
            terms.append((s - t).square().sum() / den.clamp_min(1e-12))
    total = torch.stack(terms)
    return total.sum() if form == "paper" else total.mean()


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    config: DistillConfig | None = None,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, parts)``; the hidden states are each decoder layer's output (``reduce``: see
    ``hidden_error``).

    ``parts`` holds the detached terms as tensors, so logging them costs no device sync per step.
    """
    config = config or DistillConfig()
    kl = kl_per_token(student_logits, teacher_logits, config.temperature)
    loss = kl
    parts = {"kl": kl.detach()}
    if config.weight > 0:
        hid = hidden_error(student_hidden, teacher_hidden, config.form, reduce)
        loss = loss + config.weight * hid
        parts["hidden"] = hid.detach()
    return loss, parts
