import pytest
import torch

from qtool.errors import QtoolError
from qtool.models import build_model


def test_resnet20_matches_the_paper():
    m = build_model("resnet20")
    assert sum(p.numel() for p in m.parameters()) == 269_722  # 0.27M, option-A shortcuts
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    assert len(convs) == 19  # 6n+1 convs + 1 FC = 20 weighted layers


@pytest.mark.parametrize("name, c, size", [("resnet32", 3, 32), ("resnet56", 3, 32), ("mobilenetv2", 3, 32),
                                           ("lenet5", 1, 32), ("vgg_small", 3, 32)])
def test_zoo_forward(name, c, size):
    m = build_model(name, in_channels=c).eval()
    assert m(torch.randn(2, c, size, size)).shape == (2, 10)


def test_unknown_model():
    with pytest.raises(QtoolError, match="unknown model 'resnet99'"):
        build_model("resnet99")
