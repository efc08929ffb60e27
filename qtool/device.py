"""The torch device of training and fake-quant evaluation: validated, and exact on CUDA.

On Ampere and later GPUs PyTorch may run float32 convolutions (cuDNN's default) and matmuls in TF32,
a 10-bit mantissa. Fake quantization rounds activations to codes, so TF32 moves values across
rounding boundaries: a dynamic ResNet-20 evaluated on an H100 with TF32 disagreed with the same
model on onnxruntime by 0.5-0.7 pp of top-1 (0.00 pp on the CPU). `resolve_device` turns TF32 off
whenever CUDA is used. Even in float32, cuDNN's convolution algorithms round differently from
onnxruntime's (98.3 % prediction agreement on an H100 with TF32 off, in a barely trained model), so the
final accuracies qtool reports for a model trained on CUDA (search scores, dynamic and QAT fidelity) are
computed on a CPU copy; per-epoch monitoring may stay on the GPU.
"""
from __future__ import annotations

import torch

from qtool.errors import QtoolError


def check_device(name: str | None, *, option: str = "device") -> str:
    """Validate 'cpu' | 'cuda[:N]' | None (CUDA when available, else CPU) without touching torch's global
    settings (configs call this when constructed); returns the device name."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(name, str) or name.split(":")[0] not in ("cpu", "cuda"):
        raise QtoolError(f"{option} must be cpu or cuda[:N], got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QtoolError(f"{option} {name}: CUDA is not available here")
    return name


def resolve_device(name: str | None, *, option: str = "device") -> torch.device:
    """The torch.device to run on, when the work starts: on CUDA this turns TF32 off (module docstring)."""
    name = check_device(name, option=option)
    if name.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        return torch.device(name)
    except RuntimeError:
        raise QtoolError(f"{option} must be cpu or cuda[:N], got {name!r}") from None
