"""DigitNet: the demo's CNN for the embedded digits data, shaped so that W8A8 runs faster than FP32 on a CPU.

    input 1x32x32 -> Conv 1x1 stride 4, 16 ch -> Conv 3x3, 64 ch -> MaxPool 2 -> FC 1024 -> 2048 -> FC 10
    (each Conv with BatchNorm and ReLU, which `qtool fuse` folds; 2.1 M parameters, 2.7 M MACs per image)

Why this shape (measured with onnxruntime 1.32's CPU EP, 2 threads, on an AMD EPYC (Zen 1): AVX2, no VNNI):

- The digits are 8x8 images upsampled by repeating each pixel 4x4 (qtool.data), so a 1x1 stride-4 stem
  reads every original pixel exactly once and no layer runs at 32x32. LeNet-5's int8 model was 2.7x
  slower than FP32 mostly in its 1-channel 5x5 conv at 28x28: 4.9 ms against 1.0 ms at batch 64.
- The stem is 1x1 rather than 4x4 because onnxruntime's u8s8 AVX2 kernels add each pair of adjacent
  u8 x s8 products in int16 (vpmaddubsw) and saturate: over 16 equal pixels a 4x4 stem overflowed
  on 9% of its outputs and the int8 model lost 3-6 pp top-1 (LeNet-5's 5x5 stem: 13% of outputs).
  A 1x1 kernel over one channel has K = 1, one product per pair, and its outputs match exact integer
  arithmetic (so do the 3x3 conv's after it, on the digits).
- int8 wins where a layer's time is spent moving its weights: at batch 1 the 1024 -> 2048 FC weights
  are 8 MiB in FP32 (the size of this CPU's L3) and 2 MiB in int8, and that layer runs 3.5x faster
  (0.58 -> 0.17 ms), the whole model ~2x. Compute-bound work does not gain on this CPU: its u8s8
  kernels multiply at about FP32 FMA speed, so single convs of 32-256 channels ran 1.06-1.3x FP32's
  time and batch 64 runs at ~1.0x. On CPUs whose integer dot products are faster (VNNI) the convs
  should gain too; their channel counts are multiples of 16 for those kernels.
- It reaches ~99% top-1 on the digits val and test splits in 8 epochs; a training step costs ~2.3x
  LeNet-5's, almost all of it the FC layer that makes batch 1 fast.
"""
from __future__ import annotations

import torch.nn as nn


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class DigitNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 32, patch: int = 4,
                 widths: tuple[int, int] = (16, 64), hidden: int = 2048):
        super().__init__()
        if image_size % (2 * patch):
            raise ValueError(f"image_size {image_size} must be a multiple of 2 * patch ({2 * patch})")
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, widths[0], 1, patch),  # one tap per original pixel (see the docstring)
            *_conv_bn_relu(widths[0], widths[1], 3),
            nn.MaxPool2d(2),
        )
        s = image_size // patch // 2
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(widths[1] * s * s, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))
