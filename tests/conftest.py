import os
from pathlib import Path

import pytest
from hypothesis import settings
import torch

# CI runs property tests derandomized (reproducible); locally hypothesis explores new examples.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train-jpg.tar.gz"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Decoded data sets are cached per test session, never in the user's home during tests.
    monkeypatch.setenv("QTOOL_CACHE", str(tmp_path_factory.getbasetemp() / "qtool-cache"))


@pytest.fixture
def cifar_spec():
    if not SHARED_CIFAR.exists():
        pytest.skip("../shared/data/cifar10-train-jpg.tar.gz is absent")
    return f"cifar10:{SHARED_CIFAR}"


@pytest.fixture(scope="module")
def one_thread():
    # Tiny models: a second intra-op thread only spins against the other jobs on a shared CPU.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    from qtool.data import load_dataset

    return load_dataset("digits", "train"), load_dataset("digits", "val")


@pytest.fixture(scope="module")
def lenet(digits):
    """LeNet-5 trained briefly on digits, exported with BN kept (as `qtool train` does)."""
    from qtool.models import build_model
    from qtool.training import export_onnx

    tr, _ = digits
    torch.manual_seed(0)
    m = build_model("lenet5", num_classes=10, in_channels=1)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.from_numpy(tr.preprocess.apply(tr.images)), torch.from_numpy(tr.labels)
    m.train()
    for _ in range(2):
        for i in range(0, len(x), 64):
            loss = torch.nn.functional.cross_entropy(m(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return export_onnx(m, (1, 32, 32), tr.preprocess)
