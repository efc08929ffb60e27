"""Knowledge distillation from the FP32 model.

Two uses: the labeled mix (1 - w) CE(labels) + w CE(teacher's softmax), temperature 1, of the search's
fine-tunes and the dynamic trainer (`distill_loss`); and label-free QAT (`qtool qat --loss distill`),
where every model output is trained against the FP32 model's output for the same batch
(`output_losses`, `distill_objective`).

Per output, the loss is chosen by what the output holds (`is_class_scores`): an output is *class
scores* when its values are N x C with C > 1 and any of: it is made by Softmax / LogSoftmax, its rows
are probability distributions (non-negative, summing to 1), its name says so (logit, score, class,
cls, prob), or it is the only output of a model trained with labels. Class scores get KL(teacher ||
student) at temperature 1 (softmax of logits; probabilities and log-probabilities taken as they are);
every other output gets the MSE divided by the teacher's variance on the batch, so that outputs of
different magnitudes weigh alike before `loss_weights`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from qtool.errors import QtoolError

CLASS_NAME_HINT = re.compile(r"logit|score|class|cls|prob", re.IGNORECASE)


def fp32_teacher(fused: onnx.ModelProto) -> torch.nn.Module:
    """The FP32 model the quantized nets start from (its graph lifted to PyTorch, no quantizers)."""
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


# -- per-output losses against the FP32 outputs ---------------------------------------------------------

@dataclass(frozen=True)
class OutputLoss:
    name: str
    kind: str  # "kl" (class scores) | "mse"
    form: str  # what a KL output holds: "logits" | "probs" | "logprobs" ("value" for mse)
    weight: float = 1.0

    def describe(self) -> str:
        return f"{self.name}: " + (f"KL ({self.form})" if self.kind == "kl" else "MSE / var") + \
            (f" x {self.weight:g}" if self.weight != 1 else "")


def _producers(model: onnx.ModelProto) -> dict[str, str]:
    return {o: n.op_type for n in model.graph.node for o in n.output}


def _stochastic_rows(v: np.ndarray) -> bool:
    return bool(v.min() >= 0 and np.allclose(v.sum(axis=1), 1.0, atol=1e-3))


def is_class_scores(name: str, values: np.ndarray, producer: str | None, *, only_labeled_output: bool = False) -> bool:
    """The rule of the module docstring, on an output's name, its FP32 values on a batch and its producer."""
    if values.ndim != 2 or values.shape[1] < 2 or values.dtype.kind != "f":
        return False
    return (producer in ("Softmax", "LogSoftmax") or _stochastic_rows(values) or bool(CLASS_NAME_HINT.search(name))
            or only_labeled_output)


def class_score_outputs(model: onnx.ModelProto, outputs: dict[str, np.ndarray], labeled: bool) -> list[str]:
    """The outputs of `model` (FP32 values of one batch in `outputs`) that hold class scores."""
    prod = _producers(model)
    only = labeled and len(outputs) == 1
    return [n for n, v in outputs.items() if is_class_scores(n, v, prod.get(n), only_labeled_output=only)]


def output_losses(model: onnx.ModelProto, outputs: dict[str, np.ndarray], labeled: bool,
                  weights: dict[str, float] | None = None) -> list[OutputLoss]:
    """One OutputLoss per model output (FP32 values of a batch in `outputs`, in output order);
    `weights` (output name -> weight, 1 where left out) must name outputs of the model."""
    weights = dict(weights or {})
    unknown = [n for n in weights if n not in outputs]
    if unknown:
        raise QtoolError(f"loss_weights names {unknown[0]!r}, not a model output (outputs: {list(outputs)})")
    prod = _producers(model)
    classes = set(class_score_outputs(model, outputs, labeled))
    out = []
    for n, v in outputs.items():
        if n in classes:
            form = ("logprobs" if prod.get(n) == "LogSoftmax" else
                    "probs" if prod.get(n) == "Softmax" or _stochastic_rows(v) else "logits")
            out.append(OutputLoss(n, "kl", form, weights.get(n, 1.0)))
        else:
            out.append(OutputLoss(n, "mse", "value", weights.get(n, 1.0)))
    if not any(o.weight > 0 for o in out):
        raise QtoolError("loss_weights leave every output at weight 0: nothing to train on")
    return out


def _log_probs(v: torch.Tensor, form: str) -> torch.Tensor:
    if form == "logits":
        return F.log_softmax(v, dim=1)
    if form == "probs":
        return torch.log(v.clamp_min(1e-12))
    return v


def output_loss(o: OutputLoss, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student), batch mean, or the MSE over the teacher's variance (see the module docstring)."""
    s, t = student.float(), teacher.float()
    if o.kind == "kl":
        return F.kl_div(_log_probs(s, o.form), _log_probs(t, o.form), log_target=True, reduction="batchmean")
    return F.mse_loss(s, t) / t.var(unbiased=False).clamp_min(1e-8)


def distill_objective(losses: list[OutputLoss], student_outputs, teacher_outputs) -> torch.Tensor:
    """The weighted sum of every output's loss; `*_outputs` are a tensor (one output) or a tuple in
    the model's output order, as `LiftedModule` returns them."""
    if isinstance(student_outputs, torch.Tensor):
        student_outputs, teacher_outputs = (student_outputs,), (teacher_outputs,)
    total = None
    for o, s, t in zip(losses, student_outputs, teacher_outputs):
        if o.weight:
            term = o.weight * output_loss(o, s, t)
            total = term if total is None else total + term
    return total
