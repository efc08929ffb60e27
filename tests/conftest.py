import os
from pathlib import Path

import pytest

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
