"""Pure-ONNX graph passes (onnx_ir based; never imports torch).

`fuse_pipeline()` is the pass list `qtool.fusion.fuse` repeats to a fixpoint.
"""
from __future__ import annotations

from onnx_ir.passes.common import (IdentityEliminationPass, RemoveUnusedNodesPass, ShapeInferencePass,
                                   TopologicalSortPass)

from passes.core import Fired, PipelineResult, QPass, Refusal, run_to_fixpoint, to_ir, to_proto
from passes.equalize import CrossLayerEqualizationPass
from passes.smooth import SmoothQuantPass, SmoothTarget, smooth_targets
from passes.dynamic import DynamicQuantPass, dynamic_weights
from passes.fold_affine import FoldAffinePass, fold_affine
from passes.fold_bn import FoldBatchNormPass, fold_batchnorm
from passes.pool import AveragePoolToGlobalPass, average_pool_to_global
from passes.qdq import InsertQDQPass, Marks, Role, insert_qdq, mark_tensors, register
from passes.shapes import FoldShapeChainsPass, fold_shape_chains
from passes.simplify import OnnxSimPass, simplify
from passes.untie import UntieBiasesPass, untie_biases
from passes.units import UNITS_KEY, Unit, find_units, read_units, record_units

__all__ = ["CrossLayerEqualizationPass", "SmoothQuantPass", "SmoothTarget", "smooth_targets",
           "DynamicQuantPass", "dynamic_weights", "AveragePoolToGlobalPass", "average_pool_to_global", "FoldAffinePass", "FoldBatchNormPass", "FoldShapeChainsPass", "Fired", "IdentityEliminationPass", "InsertQDQPass", "Marks",
           "OnnxSimPass", "PipelineResult", "QPass", "Refusal", "RemoveUnusedNodesPass", "Role",
           "ShapeInferencePass", "TopologicalSortPass", "UNITS_KEY", "UntieBiasesPass", "untie_biases", "Unit", "find_units", "fold_affine",
           "fold_batchnorm", "fold_shape_chains", "fuse_pipeline", "insert_qdq", "mark_tensors", "read_units", "record_units",
           "register", "run_to_fixpoint", "simplify", "to_ir", "to_proto"]


def fuse_pipeline(simplify_with_onnxsim: bool = True) -> list:
    passes = [OnnxSimPass()] if simplify_with_onnxsim else []
    # AveragePoolToGlobalPass and FoldShapeChainsPass read the shapes ShapeInferencePass just wrote
    passes += [ShapeInferencePass(), IdentityEliminationPass(), FoldShapeChainsPass(), AveragePoolToGlobalPass(),
               FoldBatchNormPass(), FoldAffinePass(),
               RemoveUnusedNodesPass(), TopologicalSortPass()]
    return passes
