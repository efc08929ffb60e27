"""Weight-only block quantization: MatMul / Gemm -> onnxruntime's com.microsoft MatMulNBits.

The targets are those of the dynamic pass (`passes.dynamic.dynamic_target`): a MatMul with a constant 2-D
weight B [K, N], or a Gemm computing A B + C (alpha = beta = 1, no transA; transB: B is [N, K]).

MatMulNBits(A, B_q, scales[, zero_points]) with attributes K, N, bits, block_size computes A W where,
for output column n and k = b * block_size + j (K padded with zeros to a whole number of blocks),

    W[k, n] = (code[n, k] - zp[n, b]) * scales[n, b]        (zp = 2^(bits-1) when zero_points is absent)

and stores, as onnxruntime's contrib op spec and its matmul_nbits_quantizer lay them out:

    B_q          uint8 [N, n_blocks, block_size * bits / 8]  codes along K, the first in the low bits
    scales       float [N * n_blocks]                        row n's blocks contiguous
    zero_points  uint8 [N * ceil(n_blocks * bits / 8)]       packed the same way, each row padded to a byte

A Gemm's bias C becomes an Add after the product (Gemm broadcasts C the way Add does).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from passes.core import PassResult, QPass, names_in, new_initializer, unique_name
from passes.dynamic import dynamic_target

MS = "com.microsoft"


@dataclass(frozen=True)
class BlockWeight:
    """A weight quantized in blocks along K, in MatMulNBits' orientation: `codes` uint8 [N, K] in
    [0, 2^bits), `scales` float32 [N, n_blocks], `zero_points` uint8 [N, n_blocks] or None (symmetric:
    the op's default 2^(bits-1))."""
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int

    @property
    def shape_kn(self) -> tuple[int, int]:
        n, k = self.codes.shape
        return k, n

    def zero_point_array(self) -> np.ndarray:
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, 2 ** (self.bits - 1), np.uint8)

    def dequantize(self) -> np.ndarray:
        """The float weight [K, N] MatMulNBits computes with (the numpy reference of the op)."""
        n, k = self.codes.shape
        bs = self.block_size
        blk = np.repeat(np.arange(self.scales.shape[1]), bs)[:k]
        z = self.zero_point_array().astype(np.float32)[:, blk]
        return ((self.codes.astype(np.float32) - z) * self.scales[:, blk]).T


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 rows of `bits`-bit values packed along the last axis, the first value in the low bits; each row
    padded with zeros to a whole byte."""
    per = 8 // bits
    rows, cols = values.shape
    padded = np.zeros((rows, -(-cols // per) * per), np.uint8)
    padded[:, :cols] = values
    out = np.zeros((rows, padded.shape[1] // per), np.uint8)
    for i in range(per):
        out |= (padded[:, i::per] << (i * bits)).astype(np.uint8)
    return out


def nbits_initializers(bw: BlockWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B_q, scales, zero_points) arrays of `bw` in MatMulNBits' layout (module docstring)."""
    if bw.bits not in (2, 4, 8) or bw.block_size < 16 or bw.block_size & (bw.block_size - 1):
        raise ValueError(f"MatMulNBits needs bits in 2/4/8 and a power-of-2 block size >= 16, got {bw.bits}, "
                         f"{bw.block_size}")
    n, k = bw.codes.shape
    nb = -(-k // bw.block_size)
    if bw.scales.shape != (n, nb) or (bw.zero_points is not None and bw.zero_points.shape != (n, nb)):
        raise ValueError(f"scales / zero points must be [N, n_blocks] = [{n}, {nb}]")
    if bw.codes.dtype != np.uint8 or int(bw.codes.max(initial=0)) >= 2 ** bw.bits:
        raise ValueError(f"codes must be uint8 in [0, {2 ** bw.bits})")
    codes = np.zeros((n, nb * bw.block_size), np.uint8)
    codes[:, :k] = bw.codes
    packed = pack_bits(codes, bw.bits).reshape(n, nb, bw.block_size * bw.bits // 8)
    zp = None if bw.zero_points is None else pack_bits(bw.zero_points, bw.bits).reshape(-1)
    return packed, np.ascontiguousarray(bw.scales, np.float32).reshape(-1), zp


class MatMulNBitsPass(QPass):
    """Rewrite each target node whose weight `weights` ({initializer name: BlockWeight}) holds."""

    def __init__(self, weights: dict[str, BlockWeight]) -> None:
        super().__init__()
        self.weights = weights

    def call(self, model: ir.Model) -> PassResult:
        g = model.graph
        self.taken = names_in(g)
        made: dict[str, tuple[ir.Value, ...]] = {}
        changed = False
        for node in list(g):
            t = dynamic_target(node)
            if t is None or t[0].name not in self.weights:
                continue
            w, axis = t
            bw = self.weights[w.name]
            expect = w.const_value.numpy().shape[::-1] if axis == 0 else w.const_value.numpy().shape
            if tuple(expect) != bw.shape_kn:
                raise ValueError(f"block weight of {w.name!r} is {bw.shape_kn} (K, N), the node's is {tuple(expect)}")
            if w.name not in made:
                arrays = nbits_initializers(bw)
                made[w.name] = tuple(new_initializer(g, a, f"{w.name}_{s}", self.taken)
                                     for a, s in zip(arrays, (f"Q{bw.bits}", "scales", "zero_points")) if a is not None)
            self._rewrite(g, node, made[w.name], bw)
            changed = True
        for name in self.weights:  # the float weights nobody reads any more
            if name in g.initializers and not g.initializers[name].uses():
                g.initializers.pop(name)
        if changed and model.opset_imports.get(MS) is None:
            model.opset_imports[MS] = 1
        g.sort()
        return PassResult(model, changed)

    def _rewrite(self, g: ir.Graph, node: ir.Node, inits: tuple[ir.Value, ...], bw: BlockWeight) -> None:
        k, n = bw.shape_kn
        base = node.name or node.outputs[0].name
        mm = ir.node("MatMulNBits", [node.inputs[0], *inits], domain=MS, name=f"{base}_MatMulNBits",
                     attributes={"K": k, "N": n, "bits": bw.bits, "block_size": bw.block_size})
        new = [mm]
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        if bias is not None:
            new.append(ir.node("Add", [mm.outputs[0], bias], name=f"{base}_bias"))
        for nd in new:
            nd.outputs[0].name = unique_name(g, f"{base}_{nd.op_type}_output", self.taken)
        y_old, y_new = node.outputs[0], new[-1].outputs[0]
        y_new.type, y_new.shape = y_old.type, y_old.shape
        g.insert_after(node, new)
        name = y_old.name
        y_old.replace_all_uses_with(y_new, replace_graph_outputs=True)
        g.remove(node, safe=True)
        y_old.name = None
        y_new.name = name
        self.fire(f"{node.op_type} {base}: MatMulNBits {bw.bits}-bit, blocks of {bw.block_size}")
