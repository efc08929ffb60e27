"""Ops of transformer / audio / detection graphs, each in a tiny ONNX-text graph: lift vs onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
import torch

from qtool.lift import lift

CASES = {
    "layernorm": """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,8] x) => (float[2,3,8] a, float[2,3,8] b, float[2,1,1] m, float[2,1,1] r) {
            s = Constant <value = float[8] {0.5, 1, 1.5, 2, -1, 0.3, 0.7, 1.1}> ()
            bb = Constant <value = float[8] {0.1, 0, -0.1, 0.2, 0, 0.3, 0, -0.3}> ()
            a = LayerNormalization <epsilon = 0.001> (x, s, bb)
            s2 = Constant <value = float[1,8] {1, 2, 3, 4, 5, 6, 7, 8}> ()
            b, m, r = LayerNormalization <axis = 1> (x, s2) }""",
    "instance_norm": """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,4,3,5] x) => (float[2,4,3,5] a) {
            s = Constant <value = float[4] {0.5, 1, 1.5, 2}> ()
            bb = Constant <value = float[4] {0.1, 0, -0.1, 0.2}> ()
            a = InstanceNormalization <epsilon = 0.01> (x, s, bb) }""",
    "group_norm21": """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2,4,3,5] x) => (float[2,4,3,5] b) {
            s = Constant <value = float[4] {0.5, 1, 1.5, 2}> ()
            bb = Constant <value = float[4] {0.1, 0, -0.1, 0.2}> ()
            b = GroupNormalization <num_groups = 2, epsilon = 0.001> (x, s, bb) }""",
    "activations20": """<ir_version: 9, opset_import: ["" : 20]>
        g (float[3,7] x) => (float[3,7] y, bool[3,7] n, bool[3,7] i) {
            a = Gelu (x)
            b = Gelu <approximate = "tanh"> (x)
            c = Elu <alpha = 0.5> (x)
            d = Celu <alpha = 2.0> (x)
            e = Selu (x)
            f = ThresholdedRelu <alpha = 0.3> (x)
            sl = Constant <value = float[7] {0.1, 0.2, 0.3, -0.1, 0, 1, 2}> ()
            h = PRelu (x, sl)
            j = Softplus (x)
            k = Softsign (x)
            l = Mish (x)
            m = Sign (x)
            o = Sin (x)
            p = Cos (x)
            three = Constant <value = float {3.0}> ()
            x3 = Mul (x, three)
            q = Ceil (x3)
            r = Floor (x3)
            half = Constant <value = float[3,7] {0.5, 1.5, 2.5, -0.5, -1.5, 0.49, 0.51, 0.5, 1.5, 2.5, -0.5, -1.5, 0.49,
                                                 0.51, 0.5, 1.5, 2.5, -0.5, -1.5, 0.49, 0.51}> ()
            t = Round (half)
            u = Mean (a, b, c)
            y = Sum (u, d, e, f, h, j, k, l, m, o, p, q, r, t)
            z = Div (x, x)
            n = IsNaN (z)
            w = Div (x, q)
            i = IsInf <detect_negative = 0> (w) }""",
    "logic_mod": """<ir_version: 8, opset_import: ["" : 17]>
        g (float[4,5] x, float[4,5] x2) => (bool[4,5] y, int64[5] m, float[4,5] f) {
            z = Constant <value = float {0.0}> ()
            a = LessOrEqual (x, z)
            b = GreaterOrEqual (x2, z)
            c = And (a, b)
            d = Or (a, b)
            e = Xor (c, d)
            y = Not (e)
            i = Constant <value = int64[5] {-7, -3, 0, 5, 9}> ()
            k = Constant <value = int64[5] {3, -2, 4, -4, 4}> ()
            m = Mod (i, k)
            f = Mod <fmod = 1> (x, x2) }""",
    "gather_scatter": """<ir_version: 8, opset_import: ["" : 18]>
        g (float[3,4] x, float[2,4] u) => (float[2,4] a, float[3,4] b, float[3,4] c, float[2,2] d, float[3,4] e) {
            i = Constant <value = int64[2,4] {0, 2, -1, 1, 2, 0, 0, -3}> ()
            a = GatherElements <axis = 0> (x, i)
            j = Constant <value = int64[2,4] {0, 2, 1, 1, 2, 0, 0, 1}> ()
            b = ScatterElements <axis = 0> (x, j, u)
            c = ScatterElements <axis = 0, reduction = "add"> (x, j, u)
            n = Constant <value = int64[2,2,2] {0, 1, 2, 3, -1, 0, 1, -2}> ()
            d = GatherND (x, n)
            si = Constant <value = int64[2,1] {2, 0}> ()
            e = ScatterND (x, si, u) }""",
    "gather_nd_batch": """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,4] x) => (float[2,2] y) {
            n = Constant <value = int64[2,2,2] {0, 1, 2, 3, 1, 0, 2, -1}> ()
            y = GatherND <batch_dims = 1> (x, n) }""",
    "tile_cumsum_trilu_einsum": """<ir_version: 8, opset_import: ["" : 17]>
        g (float[3,4] x, float[4,5] w) => (float[6,4] t, float[3,4] c1, float[3,4] c2, float[3,4] u, float[3,4] l,
                                          float[3,5] e, float[5] e2) {
            r = Constant <value = int64[2] {2, 1}> ()
            t = Tile (x, r)
            ax = Constant <value = int64 {1}> ()
            c1 = CumSum (x, ax)
            c2 = CumSum <exclusive = 1, reverse = 1> (x, ax)
            k = Constant <value = int64 {1}> ()
            u = Trilu (x, k)
            l = Trilu <upper = 0> (x)
            e = Einsum <equation = "ij,jk->ik"> (x, w)
            e2 = Einsum <equation = "ij, jk -> k"> (x, w) }""",
    "shape_ops": """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,8,2,3] x) => (int64 s, int64[2,?] nz, float[2,2,4,6] d, float[2,2,4,6] c, float[2,8,2,3] sd,
                                 float[3,4,2] oh) {
            s = Size (x)
            zero = Constant <value = float {0.0}> ()
            p = Greater (x, zero)
            sl = Constant <value = int64[2] {0, 0}> ()
            en = Constant <value = int64[2] {1, 1}> ()
            ax = Constant <value = int64[2] {1, 2}> ()
            xs = Slice (x, sl, en, ax)
            en2 = Constant <value = int64[2] {2, 3}> ()
            xs2 = Reshape (xs, en2)
            ps = Greater (xs2, zero)
            nz = NonZero (ps)
            d = DepthToSpace <blocksize = 2> (x)
            c = DepthToSpace <blocksize = 2, mode = "CRD"> (x)
            sd = SpaceToDepth <blocksize = 2> (c)
            ids = Constant <value = int64[3,2] {0, 3, -1, 5, 2, 1}> ()
            depth = Constant <value = int64 {4}> ()
            vals = Constant <value = float[2] {-1.0, 2.0}> ()
            oh = OneHot <axis = 1> (ids, depth, vals) }""",
    "topk_arg_reduce": """<ir_version: 8, opset_import: ["" : 17]>
        g (float[3,6] x) => (float[3,2] v, int64[3,2] i, int64[3,1] am, int64[6] an, float[3] r1, float[1,6] r2,
                            float[3] r3, float[3] r4, float[3] r5, float[3] r6, float[3] r7) {
            k = Constant <value = int64[1] {2}> ()
            v, i = TopK (x, k)
            am = ArgMax <axis = 1, select_last_index = 1> (x)
            an = ArgMin <axis = 0, keepdims = 0> (x)
            r1 = ReduceMin <axes = [1], keepdims = 0> (x)
            r2 = ReduceProd <axes = [0]> (x)
            r3 = ReduceL1 <axes = [1], keepdims = 0> (x)
            r4 = ReduceL2 <axes = [1], keepdims = 0> (x)
            r5 = ReduceSumSquare <axes = [1], keepdims = 0> (x)
            ax = Abs (x)
            r6 = ReduceLogSum <axes = [1], keepdims = 0> (ax)
            r7 = ReduceLogSumExp <axes = [1], keepdims = 0> (x) }""",
    "argmax_ties": """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (int64[2,1] a, int64[2,1] b) {
            c = Constant <value = float[2,3] {1, 3, 3, 2, 2, 0}> ()
            a = ArgMax <axis = 1> (c)
            b = ArgMax <axis = 1, select_last_index = 1> (c) }""",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_ort(case):
    model = onnx.parser.parse_model(CASES[case])
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}
    refs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    with torch.no_grad():
        out = lift(model).eval()(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    out = out if isinstance(out, tuple) else (out,)
    assert len(out) == len(refs)
    for o, y, ref in zip(model.graph.output, out, refs):
        assert y.dtype == torch.from_numpy(ref).dtype, o.name
        assert tuple(y.shape) == ref.shape, o.name
        np.testing.assert_allclose(y.numpy(), ref, atol=1e-5, rtol=1e-5, err_msg=o.name)


def test_new_ops_pickle_with_the_module():
    import pickle

    model = onnx.parser.parse_model(CASES["topk_arg_reduce"])
    lifted = lift(model)
    x = torch.randn(3, 6)
    again = pickle.loads(pickle.dumps(lifted))
    for a, b in zip(lifted(x), again(x)):
        assert torch.equal(a, b)
