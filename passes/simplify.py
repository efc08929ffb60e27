"""onnxsim simplification and ONNX shape inference as passes.

onnxsim folds the constant sub-graphs torch.onnx.export leaves behind (Shape/Gather/
ConstantOfShape/Pad chains on static dims, Constant nodes, Identity aliases). Its own BN fusion is
skipped so that BN folding goes through FoldBatchNormPass, which reports refusals. onnxsim stamps
its own `onnxsim.*` metadata keys; the model's metadata is restored as it was so user keys such as
`qtool.preprocess` survive and nothing else is added.
"""
from __future__ import annotations

import logging
import sys
from collections import Counter

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, ShapeInferencePass

from passes.core import PassResult, QPass, to_ir, to_proto

log = logging.getLogger(__name__)

__all__ = ["OnnxSimPass", "ShapeInferencePass", "simplify"]


def _structure(model: onnx.ModelProto) -> tuple:
    # onnxsim renames and re-orders freely; "modified" means the op mix or initializer count changed,
    # which keeps the pipeline's fixpoint test stable.
    g = model.graph
    return (tuple(sorted(Counter(n.op_type for n in g.node).items())), len(g.initializer))


def _import_onnxsim():
    """onnxsim, imported without torch where torch is not loaded yet.

    onnxsim 0.8's package __init__ tries `import torch` for its optional PPQ integration (inside a
    try/except that always fails without PPQ); that import alone is ~3 s of every `qtool fuse`. A None
    entry in sys.modules makes it fail at once; the entry is removed right after, so a later
    `import torch` in the same process works as usual. Imported here, not at the top, for the same reason.
    """
    if "onnxsim" in sys.modules or "torch" in sys.modules:
        import onnxsim
        return onnxsim
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import onnxsim
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return onnxsim


class OnnxSimPass(QPass):
    """onnxsim works on protos: the simplified graph replaces the model's graph in place."""

    def call(self, model: ir.Model) -> PassResult:
        proto = to_proto(model)
        before = _structure(proto)
        meta = dict(model.metadata_props)
        onnxsim = _import_onnxsim()
        try:
            simplified, ok = onnxsim.simplify(proto, check_n=0, skip_fuse_bn=True)
        except Exception as e:
            # onnxsim refuses some models (custom domains, odd shapes); the graph stays valid as is.
            self.refuse(ir.Node("", "Model", [], name="<model>"), f"onnxsim failed, graph left as is: {e}")
            return PassResult(model, False)
        if not ok:
            self.refuse(ir.Node("", "Model", [], name="<model>"), "onnxsim check failed, graph left as is")
            return PassResult(model, False)
        if _structure(simplified) == before:
            return PassResult(model, False)
        out = to_ir(simplified)
        # Constant nodes that onnxsim leaves must be initializers for the fusions' constant checks.
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(out)
        model.graph = out.graph
        model.metadata_props.clear()
        model.metadata_props.update(meta)
        self.fire(f"onnxsim: {len(proto.graph.node)} -> {len(simplified.graph.node)} nodes")
        return PassResult(model, True)


def simplify(model: ir.Model) -> PassResult:
    return OnnxSimPass()(model)
