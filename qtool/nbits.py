"""`quantize --activations none`: weight-only 4-bit MatMul / Gemm as onnxruntime's MatMulNBits.

    qmodel, plan = quantize_nbits(fused, QuantConfig(activations="none", weight_bits=4, algo="gptq"), feeds)

The MatMul / Gemm weights the dynamic path would quantize (`passes.dynamic_weights`: constant 2-D B, K on
axis 0, or a Gemm's B with transB) are quantized in blocks of `config.block_size` along K
(`qtool.blockquant`: round-to-nearest with MSE-optimal block scales, or GPTQ on the Hessians of the
layers' inputs over the calibration feeds) and rewritten as MatMulNBits (`passes.nbits`); activations
stay float. Two-activation MatMuls (attention scores) and Gemms with alpha / beta != 1 or transA stay
float. The Hessians are taken on the FP32 model in one pass (every layer sees FP32 inputs, not those of
the already-quantized layers before it): one onnxruntime run per batch, deterministic.

The plan holds no tensors (its entries are per-tensor / per-channel scales); its meta lists the
quantized weights with their shape, bits and block size.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict

import numpy as np
import onnx

import passes
from passes.dynamic import dynamic_target
from passes.nbits import BlockWeight, MatMulNBitsPass
from qtool.blockquant import gptq, rtn
from qtool.errors import QtoolError
from qtool.ortgraph import tap_runs
from qtool.plan import QuantPlan
from qtool.ptq import QuantConfig, excluder

log = logging.getLogger(__name__)


def weight_inputs(model: onnx.ModelProto, exclude=None) -> dict[str, tuple[int, list[str]]]:
    """{weight name: (its output-column axis, the activation tensors multiplied by it)}."""
    g = passes.to_ir(model).graph
    axes = passes.dynamic_weights(g, exclude)
    out: dict[str, tuple[int, list[str]]] = {w: (a, []) for w, a in axes.items()}
    for node in g:
        t = dynamic_target(node)
        if t is not None and t[0].name in out:
            names = out[t[0].name][1]
            if node.inputs[0].name not in names:
                names.append(node.inputs[0].name)
    return out


def hessians(model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]], tensors: list[str],
             max_batches: int | None = None) -> tuple[dict[str, np.ndarray], int]:
    """({tensor: X^T X / rows}, batches run) of each tensor's rows (its last axis is K) over `batches`."""
    acc: dict[str, np.ndarray] = {}
    rows = dict.fromkeys(tensors, 0)
    n = 0
    for _, got in tap_runs(model, batches, tensors, "GPTQ calibration", max_batches):
        for t in tensors:
            x = np.asarray(got[t], np.float64)
            x = x.reshape(-1, x.shape[-1])
            if not np.isfinite(x).all():
                raise QtoolError(f"GPTQ: the input {t!r} of a quantized MatMul holds inf/NaN on the calibration data")
            acc[t] = acc.get(t, 0) + x.T @ x
            rows[t] += len(x)
        n += 1
    if n == 0:
        raise QtoolError("no calibration batches were given")
    return {t: acc[t] / max(rows[t], 1) for t in tensors}, n


def quantize_nbits(model: onnx.ModelProto, config: QuantConfig,
                   calib_batches: Iterable[dict[str, np.ndarray]] | None = None) -> tuple[onnx.ModelProto, QuantPlan]:
    """The fused `model` with its MatMul / Gemm weights as MatMulNBits (module docstring), and the plan."""
    targets = weight_inputs(model, excluder(model, config.exclude))
    if not targets:
        raise QtoolError("nothing to quantize weight-only: the model has no MatMul/Gemm with a constant 2-D weight")
    symmetric = config.weight_symmetric
    H: dict[str, np.ndarray] = {}
    if config.algo == "gptq":
        if calib_batches is None:
            raise QtoolError("algo='gptq' learns the rounding from calibration data: give data")
        tensors = list(dict.fromkeys(t for _, names in targets.values() for t in names))
        H, n = hessians(model, calib_batches, tensors, config.max_batches)
        log.info("GPTQ: Hessians of %d MatMul inputs on %d batches", len(tensors), n)
    g = passes.to_ir(model).graph
    weights: dict[str, BlockWeight] = {}
    meta: dict[str, dict] = {}
    for name, (axis, inputs) in targets.items():
        w = g.initializers[name].const_value.numpy()
        if not np.isfinite(w).all():
            raise QtoolError(f"weight {name!r} has NaN/Inf values; it cannot be quantized")
        w_kn = w if axis == 1 else w.T
        if config.algo == "gptq":
            bw = gptq(w_kn, sum(H[t] for t in inputs), config.weight_bits, config.block_size, symmetric)
        else:
            bw = rtn(w_kn, config.weight_bits, config.block_size, symmetric)
        weights[name] = bw
        meta[name] = {"K": int(w_kn.shape[0]), "N": int(w_kn.shape[1]), "bits": config.weight_bits,
                      "block_size": config.block_size, "symmetric": symmetric}
    m = passes.to_ir(model)
    MatMulNBitsPass(weights).call(m)
    out = passes.to_proto(m)
    plan = QuantPlan(meta={"producer": "qtool.quantize", "config": asdict(config), "weight_only": meta})
    return out, plan
