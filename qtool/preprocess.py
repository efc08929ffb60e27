"""Preprocessing that travels inside the ONNX file (metadata_props), so any consumer feeds it right.

Key `qtool.preprocess` holds JSON: {"mean": [..], "std": [..], "layout": "NCHW", "scale": 1/255}.
The model input is float32 NCHW: (pixels * scale - mean) / std, per channel.
A model without the key (exported by another tool) is fed RGB NCHW pixels/255 in [0, 1]
(mean 0, std 1) unless the user gives --mean/--std.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from qtool.errors import QtoolError

METADATA_KEY = "qtool.preprocess"


@dataclass(frozen=True)
class Preprocess:
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    scale: float = 1.0 / 255.0

    def __post_init__(self):
        if self.layout != "NCHW":
            raise QtoolError(f"unsupported layout {self.layout!r} (only NCHW)")
        if len(self.mean) != len(self.std):
            raise QtoolError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise QtoolError("std values must be > 0")

    def apply(self, images_u8: np.ndarray) -> np.ndarray:
        """uint8 NCHW images -> normalized float32 NCHW model input."""
        x = images_u8.astype(np.float32) * np.float32(self.scale)
        c = x.shape[1]
        mean = np.asarray(self.mean if len(self.mean) == c else self.mean * c, np.float32)[:c]
        std = np.asarray(self.std if len(self.std) == c else self.std * c, np.float32)[:c]
        return (x - mean[None, :, None, None]) / std[None, :, None, None]

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def read_preprocess(model: onnx.ModelProto) -> Preprocess | None:
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            try:
                d = json.loads(p.value)
                return Preprocess(mean=tuple(d["mean"]), std=tuple(d["std"]), layout=d.get("layout", "NCHW"),
                                  scale=float(d.get("scale", 1 / 255)))
            except (ValueError, KeyError, TypeError) as e:
                raise QtoolError(f"model metadata {METADATA_KEY} is malformed: {e}") from None
    return None


def write_preprocess(model: onnx.ModelProto, pre: Preprocess) -> None:
    for p in list(model.metadata_props):
        if p.key == METADATA_KEY:
            model.metadata_props.remove(p)
    model.metadata_props.add(key=METADATA_KEY, value=pre.to_json())


def resolve_preprocess(model: onnx.ModelProto, mean: tuple[float, ...] | None = None,
                       std: tuple[float, ...] | None = None) -> Preprocess:
    """Command-line --mean/--std win, then the model's metadata, then the [0, 1] default."""
    if mean is not None or std is not None:
        m = tuple(mean) if mean is not None else (0.0,)
        s = tuple(std) if std is not None else (1.0,)
        if len(m) != len(s) and 1 not in (len(m), len(s)):
            raise QtoolError(f"--mean has {len(m)} values but --std has {len(s)}")
        n = max(len(m), len(s))
        return Preprocess(mean=m * (n // len(m)), std=s * (n // len(s)))
    return read_preprocess(model) or Preprocess()
