"""qtool.device: one validation of cpu / cuda[:N] for qat, search and dynamic; TF32 off on CUDA."""
from __future__ import annotations

import pytest
import torch

from qtool.device import resolve_device
from qtool.errors import QtoolError


def test_cpu_and_default():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "", "CPU", 3])
def test_bad_names_are_input_errors(name):
    with pytest.raises(QtoolError, match="device"):  # cuda:x without a GPU: "device cuda:x: CUDA is not ..."
        resolve_device(name)


def test_cuda_without_gpu_or_exact_with_one():
    if not torch.cuda.is_available():
        with pytest.raises(QtoolError, match="CUDA is not available"):
            resolve_device("cuda")
    else:
        torch.backends.cudnn.allow_tf32 = True
        assert resolve_device("cuda").type == "cuda"
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
