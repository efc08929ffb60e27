"""Fold shape computations (Shape -> Gather -> Unsqueeze -> Concat -> Reshape) to constants.

torch.onnx.export writes `x.view(x.size(0), -1)`, ViT's `x.reshape(n, c, -1)` and friends as a chain that
reads a tensor's shape at run time. onnxsim folds such a chain only when the whole shape is static; with a
symbolic batch (dynamic axes) it keeps all of it, and the integer-only export has no lowering for a
Shape. What is constant is folded here:

- Shape(x) (with its start / end) whose selected dims are all static -> an int64 constant;
- Gather(Shape(x), constant indices) whose gathered dims are static -> an int64 constant, even when other
  dims of x are symbolic;
- Reshape(data, Concat(...)) whose shape pieces are constants or the dims of `data` itself at the same
  position (Unsqueeze(Gather(Shape(v), j)) with v's dim j equal to data's dim i: the same static value or
  the same symbol, which ONNX shape inference gives only to equal dims) -> Reshape(data, constant) with
  those entries 0. Exact: with allowzero=0, a 0 in Reshape's shape copies the input's dim at that position.
  Refused (with the reason) when allowzero=1 or when any piece stays unknown.

onnxsim then folds what became constant (Unsqueeze / Concat of constants) and RemoveUnusedNodesPass drops
the dead Shape nodes.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.core import PassResult, QPass, const_array, new_initializer


def _int(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return a.as_int() if a is not None else default


def _shape_dims(node: ir.Node) -> list | None:
    """The dims a Shape node returns (ints or symbols), None when the input's rank is unknown."""
    x = node.inputs[0]
    if x is None or x.shape is None:
        return None
    dims = list(x.shape)
    r = len(dims)
    start, end = _int(node, "start", 0), _int(node, "end", r)
    start, end = (start + r if start < 0 else start), (end + r if end < 0 else end)
    return dims[max(0, min(start, r)):max(0, min(end, r))]


def _static(dims: list) -> bool:
    return all(isinstance(d, int) for d in dims)


def _is_shape(v: ir.Value | None) -> bool:
    p = v.producer() if v is not None else None
    return p is not None and p.op_type == "Shape" and p.domain in ("", "ai.onnx")


def _gathered_dims(node: ir.Node) -> list | None:
    """Dims selected by Gather(Shape(x), constant indices), scalar indices as a one-element list."""
    if len(node.inputs) != 2 or not _is_shape(node.inputs[0]) or _int(node, "axis", 0) != 0:
        return None
    idx = const_array(node.inputs[1])
    dims = _shape_dims(node.inputs[0].producer())
    if idx is None or dims is None or idx.ndim > 1:
        return None
    out = []
    for i in np.atleast_1d(idx).tolist():
        i = int(i) + (len(dims) if i < 0 else 0)
        if not 0 <= i < len(dims):
            return None
        out.append(dims[i])
    return out


class FoldShapeChainsPass(QPass):
    def call(self, model: ir.Model) -> PassResult:
        g = model.graph
        modified = False
        for node in list(g):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Shape":
                dims = _shape_dims(node)
                if dims is not None and _static(dims):
                    modified |= self._to_const(g, node, np.array(dims, np.int64))
            elif node.op_type == "Gather":
                dims = _gathered_dims(node)
                if dims is not None and _static(dims):
                    scalar = const_array(node.inputs[1]).ndim == 0
                    modified |= self._to_const(g, node, np.array(dims[0] if scalar else dims, np.int64))
            elif node.op_type == "Reshape":
                modified |= self._reshape(g, node)
        return PassResult(model, modified)

    def _to_const(self, g: ir.Graph, node: ir.Node, value: np.ndarray) -> bool:
        out = node.outputs[0]
        if out.is_graph_output() or not out.uses():
            return False
        c = new_initializer(g, value, f"{out.name or node.name}_const")
        out.replace_all_uses_with(c)
        self.fire(f"{node.op_type} {node.name!r} -> constant {value.tolist()}")
        return True

    def _reshape(self, g: ir.Graph, node: ir.Node) -> bool:
        data, shape = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
        if shape is None or shape.const_value is not None:
            return False
        cat = shape.producer()
        if cat is None or cat.op_type != "Concat" or _int(cat, "axis", 0) != 0:
            return False
        if not any(_is_shape(p) or (p.producer() is not None and p.producer().op_type in ("Unsqueeze", "Gather"))
                   for p in cat.inputs if p is not None):
            return False  # not a shape chain
        if _int(node, "allowzero", 0):
            self.refuse(node, "shape from a Shape chain not folded: allowzero=1 (0 means a zero-size dim)")
            return False
        if data is None or data.shape is None:
            self.refuse(node, "shape from a Shape chain not folded: the data's rank is unknown")
            return False
        in_dims = list(data.shape)
        pieces: list[int] = []
        for p in cat.inputs:
            vals = self._piece(p)
            if vals is None:
                self.refuse(node, f"shape from a Shape chain not folded: piece {p.name!r} of {cat.name!r} is not "
                                  "a constant nor a dim of the data at its position")
                return False
            for k, v in enumerate(vals):
                pos = len(pieces) + k
                if not isinstance(v, int):  # a dim of some tensor: must be the data's own dim at this position
                    if getattr(v, "value", None) is None:  # an unnamed dim equals nothing we can prove
                        self.refuse(node, f"shape from a Shape chain not folded: entry {pos} is an unnamed dim")
                        return False
                    if pos >= len(in_dims) or in_dims[pos] != v:
                        self.refuse(node, f"shape from a Shape chain not folded: entry {pos} is dim {v} of another "
                                          f"tensor, the data's dims are {[str(d) for d in in_dims]}")
                        return False
                    v = 0  # copy the data's dim (allowzero=0)
                pieces.append(int(v))
        node.replace_input_with(1, new_initializer(g, np.array(pieces, np.int64), f"{node.name or 'reshape'}_shape"))
        self.fire(f"Reshape {node.name!r}: shape chain -> constant {pieces}")
        return True

    @staticmethod
    def _piece(p: ir.Value | None) -> list | None:
        """A Concat piece as a list of ints (constants) and dims (ints or symbols) read from Shape."""
        if p is None:
            return None
        c = const_array(p)
        if c is not None:
            return [int(v) for v in np.atleast_1d(c).tolist()] if np.issubdtype(c.dtype, np.integer) else None
        prod = p.producer()
        if prod is None:
            return None
        if prod.op_type == "Shape":
            return _shape_dims(prod)
        if prod.op_type == "Gather":
            idx = const_array(prod.inputs[1]) if len(prod.inputs) == 2 else None
            return _gathered_dims(prod) if idx is not None and idx.ndim == 1 else None
        if prod.op_type == "Unsqueeze" and len(prod.inputs) == 2:
            axes = const_array(prod.inputs[1])
            src = prod.inputs[0].producer() if prod.inputs[0] is not None else None
            if axes is not None and axes.size == 1 and int(axes.ravel()[0]) in (0, -1) and src is not None \
                    and src.op_type == "Gather" and const_array(src.inputs[1]) is not None \
                    and const_array(src.inputs[1]).ndim == 0:
                return _gathered_dims(src)
        return None


def fold_shape_chains(model: ir.Model) -> PassResult:
    return FoldShapeChainsPass()(model)
