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
                                           ("lenet5", 1, 32), ("vgg_small", 3, 32),
                                           ("digitnet", 1, 32)])
def test_zoo_forward(name, c, size):
    m = build_model(name, in_channels=c).eval()
    assert m(torch.randn(2, c, size, size)).shape == (2, 10)


def test_digitnet_stem_reads_one_pixel_per_patch():
    # 1x1 stride 4: one tap per original digits pixel, and K = 1 keeps onnxruntime's u8s8 AVX2 kernel
    # from saturating its int16 pair sums (a 4x4 stem did: qtool/models/digitnet.py)
    m = build_model("digitnet", in_channels=1)
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    assert (convs[0].kernel_size, convs[0].stride, convs[0].in_channels) == ((1, 1), (4, 4), 1)
    assert all(c.out_channels % 16 == 0 for c in convs)


def test_unknown_model():
    with pytest.raises(QtoolError, match="unknown model 'resnet99'"):
        build_model("resnet99")
