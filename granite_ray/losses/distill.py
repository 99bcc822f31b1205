"""Contrastive distillation (Granite Embedding R2, after Hinton et al. 2015): KL divergence from
softmax(teacher / tau) to softmax(student / tau) over each query's candidates.

Inputs: student scores [B, N] (query-candidate cosine similarities, positive first) and the
teacher's scores for the same candidates [B, N]. The KL differs from the cross-entropy of the
recipe by the teacher's entropy, a constant: same gradients, and zero when student matches teacher.
Scaled by tau^2 so gradient magnitudes do not depend on tau.
"""

from __future__ import annotations

import torch


def distillation_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor, temperature: float = 1.0,
                      teacher_temperature: float | None = None) -> torch.Tensor:
    student = torch.log_softmax(student_scores / temperature, dim=1)
    teacher = torch.softmax(teacher_scores.detach() / (teacher_temperature or temperature), dim=1)
    return torch.nn.functional.kl_div(student, teacher, reduction="batchmean") * temperature ** 2
