"""Knowledge distillation from the FP32 model, shared by QAT fine-tunes (`qtool.search`) and the dynamic
trainer (`qtool.dynamic`): the loss (1 - w) CE(labels) + w CE(teacher's softmax), temperature 1."""
from __future__ import annotations

import onnx
import torch
import torch.nn.functional as F



def fp32_teacher(fused: onnx.ModelProto) -> torch.nn.Module:
    """The FP32 model the quantized nets start from (its graph lifted to PyTorch)."""
    from qtool.lift import lift

    return lift(fused)


@torch.no_grad()
def soft_labels(teacher: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.softmax(teacher(x).float(), dim=1)


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor | None, weight: float,
                 reduction: str = "mean") -> torch.Tensor:
    """CE on the labels, mixed with CE on `soft` (weight w) when given."""
    loss = F.cross_entropy(logits, labels, reduction=reduction)
    if soft is not None and weight:
        loss = (1 - weight) * loss + weight * F.cross_entropy(logits, soft, reduction=reduction)
    return loss


