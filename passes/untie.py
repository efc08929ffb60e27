"""Give every Conv/ConvTranspose/Gemm its own bias initializer.

onnxsim (and other exporters) merge identical initializers, so several layers can read one bias
tensor (typically all-zero biases of a randomly initialised or BN-free net). A quantized bias is
int32 with scale s_input * s_weight, which differs per layer: a shared bias would be quantized
with one layer's scale and ORT would refuse to fuse the others (float fallbacks). Untying costs
a few bytes per layer and keeps every bias quantizable.
"""
from __future__ import annotations

import onnx_ir as ir

from passes.core import QPass, PassResult, new_initializer

BIAS_OPS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}


class UntieBiasesPass(QPass):
    def call(self, model: ir.Model) -> PassResult:
        modified = False
        g = model.graph
        for node in g:
            idx = BIAS_OPS.get(node.op_type)
            if idx is None or len(node.inputs) <= idx:
                continue
            b = node.inputs[idx]
            if b is None or b.const_value is None or len(b.uses()) < 2:
                continue
            copy = new_initializer(g, b.const_value.numpy().copy(), f"{b.name}_{node.name}")
            node.replace_input_with(idx, copy)
            self.fire(f"bias {b.name!r} of {node.name!r} untied from {len(b.uses())} other readers")
            modified = True
        return PassResult(model, modified)


def untie_biases(model: ir.Model) -> PassResult:
    return UntieBiasesPass()(model)
