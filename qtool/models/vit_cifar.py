"""A compact vision transformer for 32x32 inputs.

Tokens come from a two-convolution tokenizer (Hassani et al. 2021, "Escaping the Big Data Paradigm
with Compact Transformers") instead of ViT's single patch projection: on CIFAR-10 it reaches ViT
accuracy in a fraction of the epochs, which is what a 2-core CPU can train. Everything after the
tokenizer is a plain pre-norm ViT encoder (LayerNorm, softmax attention, GELU MLP) and is exported
with the ops transformers' ViT exports have, so it exercises the same quantization paths.
Attention is written out (Linear, MatMul, Softmax) rather than nn.MultiheadAttention so the ONNX
graph has the usual MatMul/Softmax pattern.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTCifar(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, dim: int = 128, depth: int = 6, heads: int = 4,
                 mlp_ratio: int = 2, stem: int = 32):
        super().__init__()
        # 32x32 -> 16x16 -> 8x8: 64 tokens
        self.tokenizer = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
            nn.Conv2d(stem, dim, 3, 1, 1, bias=False), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.pos = nn.Parameter(torch.zeros(1, 64, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.tokenizer(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))
