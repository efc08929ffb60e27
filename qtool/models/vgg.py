"""A small VGG for 32x32 inputs: 3 stages of two 3x3 conv-BN-ReLU, max pooling, one FC."""
from __future__ import annotations

import torch
import torch.nn as nn


class VGGSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths=(32, 64, 128)):
        super().__init__()
        layers, c = [], in_channels
        for w in widths:
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
                c = w
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
