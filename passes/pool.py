"""An AveragePool whose single window covers the whole spatial map becomes GlobalAveragePool.

Exporters write a global pooler as AveragePool(kernel = map, ceil_mode=1) (EfficientNet-B0's pooler,
torch's AvgPool2d(7) on a 7x7 map). GlobalAveragePool says the same thing in the form every backend
knows: QLinearGlobalAveragePool in onnxruntime, the integer exporter's ReduceSum, QAT's exact eval
kernel (qtool.ortexact); a big-window AveragePool with ceil_mode and padding gets none of these.

Math, per spatial axis, input size H, kernel k, pads (b, e), stride s (dilation 1). ONNX / onnxruntime:

    n_out = trunc((H + b + e - k) / s) + 1                      ceil_mode = 0
    n_out = ceil((H + b + e - k) / s) + 1, minus 1 if the last window would start at or after H + b
                                                                ceil_mode = 1

With n_out = 1 the one window spans [-b, -b + k). Its value is sum(x[w ∩ [0, H)]) / d where d counts

- count_include_pad = 0: the input elements in the window, |w ∩ [0, H)|;
- count_include_pad = 1 (onnxruntime, measured): with ceil_mode the elements of the padded input in the
  window, |w ∩ [-b, H + e)| = min(k, H + b + e) (what ceil_mode adds past the padding is not counted);
  without ceil_mode the whole kernel, k, even where the window reaches past the padded input.

It equals the global mean sum(x) / H exactly when the window covers the map, k - b >= H, and d = H:
always for count_include_pad = 0; for count_include_pad = 1 only when b = 0 and, with ceil_mode,
min(k, H + e) = H, without it k = H (no pad element counted in the divisor). Everything else (a real pooling grid, a window that misses part of
the map, padding counted in the divisor, dilations, auto_pad, unknown shapes) is refused with the reason,
and so is a pool whose ONNX-inferred output shape is not 1 x 1 where onnxruntime's rule gives one window
(the two differ at the edges: onnxruntime truncates toward zero and drops a last window in the padding).
tests/test_passes.py checks the rule against onnxruntime on a grid of parameters.
"""
from __future__ import annotations

import math

import onnx_ir as ir

from passes.core import PassResult, QPass, replace_value


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    a = node.attributes.get(name)
    return list(a.as_ints()) if a is not None else default


def _int(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return a.as_int() if a is not None else default


def output_size(h: int, k: int, b: int, e: int, s: int, ceil_mode: bool) -> int:
    """Pooled size along one axis, onnxruntime's rule (pool_attributes.h)."""
    span = h + b + e - k
    # floor mode is C++ integer division there, which truncates toward zero (span = -1, s = 3 gives 1)
    n = (math.ceil(span / s) if ceil_mode else int(span / s)) + 1
    if ceil_mode and n > 0 and (n - 1) * s >= h + b:
        n -= 1  # the last window would start inside the end padding
    return n


def global_mean_reason(spatial: list[int], kernel: list[int], pads: list[int], strides: list[int],
                       ceil_mode: bool, count_include_pad: bool) -> str | None:
    """Why AveragePool with these parameters is not the global mean of a map of size `spatial` (None: it is)."""
    nd = len(spatial)
    for ax in range(nd):
        h, k, b, e, s = spatial[ax], kernel[ax], pads[ax], pads[ax + nd], strides[ax]
        n = output_size(h, k, b, e, s, ceil_mode)
        if n != 1:
            return f"output size {n} along spatial axis {ax} (kernel {k}, map {h}): not one window"
        if k - b < h:
            return f"the window misses part of the map along spatial axis {ax} (kernel {k} - pad {b} < {h})"
        if count_include_pad:
            d = min(k, h + b + e) if ceil_mode else k
            if d != h:
                return (f"count_include_pad=1 counts {d - h} pad element(s) in the divisor along spatial axis {ax}: "
                        "not the mean")
    return None


class AveragePoolToGlobalPass(QPass):
    def call(self, model: ir.Model) -> PassResult:
        modified = False
        for node in list(model.graph):
            if node.op_type != "AveragePool" or node.domain not in ("", "ai.onnx"):
                continue
            reason = self._check(node)
            if reason:
                self.refuse(node, f"AveragePool not made global: {reason}")
                continue
            gap = ir.node("GlobalAveragePool", [node.inputs[0]], name=node.name)
            y = gap.outputs[0]
            y.type, y.shape = node.outputs[0].type, node.outputs[0].shape
            model.graph.insert_before(node, gap)
            old = node.outputs[0]
            name = old.name
            replace_value(old, y)  # a graph output keeps its public name
            old.name = None  # names are unique per graph: free it before the new value takes it
            y.name = name
            model.graph.remove(node, safe=True)
            self.fire(f"AveragePool {node.name!r} covering the whole map -> GlobalAveragePool")
            modified = True
        return PassResult(model, modified)

    def _check(self, node: ir.Node) -> str | None:
        x = node.inputs[0]
        shape = x.shape if x is not None else None
        if shape is None or len(shape) < 3:
            return "input shape unknown (shape inference found no rank >= 3)"
        spatial = list(shape)[2:]
        if not all(isinstance(d, int) for d in spatial):
            return f"spatial dims {[str(d) for d in spatial]} are not static"
        nd = len(spatial)
        auto_pad = node.attributes.get("auto_pad")
        if auto_pad is not None and auto_pad.as_string() not in ("NOTSET", "VALID"):
            return f"auto_pad={auto_pad.as_string()}"
        if any(d != 1 for d in _ints(node, "dilations", [1] * nd)):
            return "dilations != 1"
        kernel = _ints(node, "kernel_shape", [])
        pads = _ints(node, "pads", [0] * (2 * nd))
        strides = _ints(node, "strides", [1] * nd)
        if len(kernel) != nd or len(pads) != 2 * nd or len(strides) != nd:
            return "kernel_shape / pads / strides do not match the input rank"
        reason = global_mean_reason(spatial, kernel, pads, strides, bool(_int(node, "ceil_mode", 0)),
                                    bool(_int(node, "count_include_pad", 0)))
        if reason:
            return reason
        # ONNX's own shape inference (which the rest of the graph was typed with) must agree: 1 x ... x 1.
        out = node.outputs[0].shape
        if out is not None and len(out) == len(shape) and any(d != 1 for d in list(out)[2:]):
            return f"the graph's inferred output shape {[str(d) for d in out]} is not 1 x 1"
        return None


def average_pool_to_global(model: ir.Model) -> PassResult:
    return AveragePoolToGlobalPass()(model)
