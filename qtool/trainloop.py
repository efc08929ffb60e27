"""The one training loop of qtool: FP32 `qtool train`, `qtool qat`, the search's supernet and
fine-tunes, and the dynamic trainer all step their models through `train_loop`.

What differs between them is passed in, not copied: the batch stream (`qtool.data.epoch_batches`
for epoch-wise training, `qtool.data.step_batches` for a fixed number of steps), the loss
(`loss_fn(x, y) -> (logits, loss)`: plain cross-entropy, distillation, the sandwich rule's several
configurations, the dynamic net's BitFLOPs penalty), the optimizers (the dynamic trainer steps the
controller's Adam beside the network's SGD) and the scheduler. One step is always: zero every
optimizer's gradients, loss_fn, back-propagate, step every optimizer, step the scheduler.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

__all__ = ["EpochMeter", "train_loop", "supervised", "split_decay", "to_device", "forward"]


class EpochMeter:
    """Running loss / top-1 of one training epoch: what the progress bar and the history show.
    Batches without labels (label-free distillation) count towards the loss only."""

    def __init__(self) -> None:
        self.n = self.correct = self.labeled = 0
        self.loss_sum = 0.0

    def update(self, logits: torch.Tensor, labels: torch.Tensor | None, loss: torch.Tensor) -> None:
        n = len(logits if labels is None else labels)
        self.n += n
        if labels is not None:
            self.labeled += n
            self.correct += int((logits.argmax(1) == labels).sum())
        self.loss_sum += loss.item() * n

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n, 1)

    @property
    def acc(self) -> float | None:
        return self.correct / self.labeled if self.labeled else None

    def info(self, epoch: int, epochs: int) -> str:
        return f"epoch {epoch + 1}/{epochs} loss {self.loss:.3f}" + (f" acc {self.acc:.3f}" if self.labeled else "")


def to_device(x, device):
    """A batch's inputs (a tensor, or {input name: tensor} for models of several inputs) or labels
    (None without labels) on `device`."""
    if x is None or device is None:
        return x
    if isinstance(x, dict):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


def forward(model: nn.Module, x):
    """model(x), or model(**x) for a batch given as {input name: tensor}."""
    return model(**x) if isinstance(x, dict) else model(x)


def supervised(model: nn.Module, criterion: Callable) -> Callable:
    """loss_fn of plain supervised training: (model(x), criterion(model(x), y))."""

    def loss_fn(x, y):
        logits = model(x)
        return logits, criterion(logits, y)

    return loss_fn


def split_decay(params: Iterable[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, the rest): weight decay applies to tensors of rank > 1 only, never to biases, BN
    affine parameters, quantizer scales or clip values."""
    decay, no_decay = [], []
    for p in params:
        (decay if p.ndim > 1 else no_decay).append(p)
    return decay, no_decay


def train_loop(model: nn.Module, batches: Iterable, loss_fn: Callable, optimizers: list, scheduler=None, *,
               device: torch.device | str | None = None, meter: EpochMeter | None = None,
               on_step: Callable[[int, float], None] | None = None, backward: bool = True) -> None:
    """Train `model` (put in train mode) for one pass over `batches` of (x, y); x may be a dict of
    inputs and y None (label-free batches), see `to_device`.

    `loss_fn(x, y) -> (logits, loss)`; with `backward=False` loss_fn back-propagates itself (the
    sandwich rule frees each configuration's graph before running the next) and returns the loss as
    a float. `meter` collects loss/top-1 (it needs a tensor loss); `on_step(step, loss)` runs after
    each optimizer step (progress bars).
    """
    model.train()
    for step, (x, y) in enumerate(batches):
        x, y = to_device(x, device), to_device(y, device)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        logits, loss = loss_fn(x, y)
        if backward:
            loss.backward()
        for opt in optimizers:
            opt.step()
        if scheduler is not None:
            scheduler.step()
        if meter is not None:
            meter.update(logits, y, loss)
        if on_step is not None:
            on_step(step, float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss))
