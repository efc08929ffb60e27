"""QuantPlan: the one description of how a graph is quantized (docs/DESIGN.md, "One plan, many producers").

JSON, version 1:

    {"version": 1,
     "meta": {...free-form provenance: producer, calib method...},
     "tensors": {
        "<tensor name in the fused graph>": {
            "kind": "activation" | "weight",
            "bits": 2..8, "signed": bool, "narrow": bool,
            "granularity": "per_tensor" | "per_channel", "axis": int | null,
            "scale": float | [float, ...] | null,        # null = to be calibrated
            "zero_point": int | [int, ...] | null}}}

Integer range: signed -> [-2^(b-1), 2^(b-1)-1], unsigned -> [0, 2^b-1]; `narrow` drops the most
negative signed code (symmetric weights: int8 [-127, 127], int4 [-7, 7]). Values are stored in 8-bit
containers (int8 / uint8) whatever `bits` is, so a 4-bit weight is an int8 tensor whose codes stay in
[-7, 7]. Biases are not in the plan: they are int32 with scale s_input * s_weight and zero point 0,
derived from the entries of their node's input and weight.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qtool.errors import QtoolError
from qtool.io import atomic_write_text

PLAN_VERSION = 1
# int32 bias codes are held to +-2^30, not +-2^31: onnxruntime adds the bias to the int32 sum of products
# and wraps on overflow, so a bias saturated at -2^31 plus a negative sum came out as a large positive
# value (a random-weight MobileNetV2 channel whose folded BN bias is ~1e9 codes: 18 output codes off).
# The sum of products stays below 2^30 up to K = 33,000 full-range uint8 x int8 products.
BIAS_CODE_LIMIT = 2**30
KINDS = ("activation", "weight")
GRANULARITIES = ("per_tensor", "per_channel")


@dataclass(frozen=True)
class TensorQuant:
    kind: str
    bits: int
    signed: bool
    granularity: str = "per_tensor"
    axis: int | None = None
    scale: float | tuple[float, ...] | None = None
    zero_point: int | tuple[int, ...] | None = None
    narrow: bool = False

    def __post_init__(self):
        where = "tensor quantization"
        if self.kind not in KINDS:
            raise QtoolError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise QtoolError(f"{where}: bits must be an integer in 2..8, got {self.bits!r}")
        if not isinstance(self.signed, bool) or not isinstance(self.narrow, bool):
            raise QtoolError(f"{where}: signed and narrow must be true/false")
        if self.narrow and not self.signed:
            raise QtoolError(f"{where}: narrow range applies to signed tensors only")
        if self.granularity not in GRANULARITIES:
            raise QtoolError(f"{where}: granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        per_channel = self.granularity == "per_channel"
        if per_channel and (not isinstance(self.axis, int) or isinstance(self.axis, bool) or self.axis < 0):
            raise QtoolError(f"{where}: per_channel needs a non-negative integer axis, got {self.axis!r}")
        if not per_channel and self.axis is not None:
            raise QtoolError(f"{where}: per_tensor must have axis null")
        if (self.scale is None) != (self.zero_point is None):
            raise QtoolError(f"{where}: scale and zero_point must both be set or both be null")
        if self.scale is None:
            return
        scales = self.scale if isinstance(self.scale, tuple) else (self.scale,)
        zps = self.zero_point if isinstance(self.zero_point, tuple) else (self.zero_point,)
        if per_channel != isinstance(self.scale, tuple) or per_channel != isinstance(self.zero_point, tuple):
            raise QtoolError(f"{where}: per_channel needs lists of scale/zero_point, per_tensor single numbers")
        if len(scales) != len(zps) or not scales:
            raise QtoolError(f"{where}: {len(scales)} scales but {len(zps)} zero points")
        for s in scales:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
                raise QtoolError(f"{where}: scale must be a finite number > 0, got {s!r}")
        lo, hi = self.qrange
        for z in zps:
            if isinstance(z, bool) or not isinstance(z, int) or not lo <= z <= hi:
                raise QtoolError(f"{where}: zero_point must be an integer in [{lo}, {hi}], got {z!r}")

    @property
    def qrange(self) -> tuple[int, int]:
        if self.signed:
            hi = 2 ** (self.bits - 1) - 1
            return (-hi if self.narrow else -hi - 1), hi
        return 0, 2**self.bits - 1

    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("scale", "zero_point"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Any, name: str) -> TensorQuant:
        if not isinstance(d, dict):
            raise QtoolError(f"plan tensor {name!r}: expected an object, got {type(d).__name__}")
        unknown = set(d) - {"kind", "bits", "signed", "granularity", "axis", "scale", "zero_point", "narrow"}
        if unknown:
            raise QtoolError(f"plan tensor {name!r}: unknown fields {sorted(unknown)}")
        for req in ("kind", "bits", "signed"):
            if req not in d:
                raise QtoolError(f"plan tensor {name!r}: missing field {req!r}")
        kw = dict(d)
        for k in ("scale", "zero_point"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(kw[k])
        try:
            return cls(**kw)
        except QtoolError as e:
            raise QtoolError(f"plan tensor {name!r}: {str(e).split(': ', 1)[-1]}") from None


@dataclass
class QuantPlan:
    tensors: dict[str, TensorQuant] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def to_json(self) -> str:
        # One line per tensor: per-channel scale lists stay readable and diffable.
        rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v.to_dict())}" for k, v in self.tensors.items())
        return (f'{{"version": {json.dumps(self.version)},\n "meta": {json.dumps(self.meta)},\n'
                f' "tensors": {{\n{rows}\n }}\n}}\n')

    @classmethod
    def from_json(cls, text: str, model: onnx.ModelProto | None = None) -> QuantPlan:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise QtoolError(f"plan is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise QtoolError("plan must be a JSON object")
        if d.get("version") != PLAN_VERSION:
            raise QtoolError(f"unsupported plan version {d.get('version')!r} (expected {PLAN_VERSION})")
        tensors = d.get("tensors")
        if not isinstance(tensors, dict):
            raise QtoolError("plan has no 'tensors' object")
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise QtoolError("plan 'meta' must be an object")
        plan = cls({k: TensorQuant.from_dict(v, k) for k, v in tensors.items()}, meta)
        if model is not None:
            plan.validate(model)
        return plan

    def save(self, path: str | os.PathLike) -> Path:
        atomic_write_text(path, self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: onnx.ModelProto | None = None) -> QuantPlan:
        p = Path(path)
        if not p.is_file():
            raise QtoolError(f"plan file not found: {p}")
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise QtoolError(f"cannot read plan {p}: {e}") from None
        return cls.from_json(text, model)

    def validate(self, model: onnx.ModelProto) -> None:
        """Every entry names a tensor of `model`; weights match their initializer's shape."""
        g = model.graph
        inits = {t.name: t for t in g.initializer}
        names = set(inits) | {v.name for v in g.input} | {o for n in g.node for o in n.output}
        for name, tq in self.tensors.items():
            if name not in names:
                raise QtoolError(f"plan tensor {name!r} is not in the model")
            if tq.kind == "weight" and name not in inits:
                raise QtoolError(f"plan weight {name!r} is not an initializer of the model")
            if tq.granularity == "per_channel" and name in inits:
                dims = list(inits[name].dims)
                if tq.axis >= len(dims):
                    raise QtoolError(f"plan tensor {name!r}: axis {tq.axis} out of range for rank {len(dims)}")
                if tq.scale is not None and len(tq.scale) != dims[tq.axis]:
                    raise QtoolError(f"plan tensor {name!r}: {len(tq.scale)} scales for {dims[tq.axis]} channels")

    @property
    def calibrated(self) -> bool:
        return all(t.calibrated for t in self.tensors.values())

    def summary_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            key = f"{t.kind}:{'s' if t.signed else 'u'}{t.bits}:{t.granularity}"
            out[key] = out.get(key, 0) + 1
        return out


MIN_SCALE = float(np.finfo(np.float32).tiny)


def scale_of(x: float) -> float:
    """A float32 scale; a range so small that range/levels underflows float32 gets the smallest
    normal float32, never 0 (ORT divides by the scale)."""
    return max(float(np.float32(x)), MIN_SCALE)


def range_quant(rmin: float, rmax: float, bits: int, signed: bool = False, symmetric: bool = False) -> TensorQuant:
    """An activation's TensorQuant for the calibrated range [rmin, rmax] (0 always representable)."""
    proto = TensorQuant("activation", bits, signed)
    qmin, qmax = proto.qrange
    rmin, rmax = min(rmin, 0.0), max(rmax, 0.0)  # 0 must be exact (padding, Relu)
    if signed and symmetric:
        t = max(-rmin, rmax)
        s = scale_of(t / qmax) if t > 0 else 1.0
        return TensorQuant("activation", bits, True, scale=s, zero_point=0)
    s = scale_of((rmax - rmin) / (qmax - qmin)) if rmax > rmin else 1.0
    zp = int(np.clip(np.rint(qmin - rmin / s), qmin, qmax))
    return TensorQuant("activation", bits, signed, scale=s, zero_point=zp)
