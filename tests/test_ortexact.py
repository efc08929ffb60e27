"""qtool.ortexact against onnxruntime itself: each emulated kernel returns the codes ORT's optimized
QDQ group returns, on random and exhaustive inputs; the plain float fake-quant does not always."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from qtool.fakequant import fake_quant
from qtool.ortexact import ExactAdd, ExactConv, ExactGlobalAveragePool
from qtool.plan import TensorQuant

f32 = np.float32


def _run(nodes, inits, feeds, fused_op):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info(k, T.FLOAT, list(v.shape)) for k, v in feeds.items()],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], [nh.from_array(v, k) for k, v in inits.items()])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    from qtool.ortgraph import integer_kernel_report

    assert fused_op in str(integer_kernel_report(m).op_histogram)  # the group really ran as an integer kernel
    return sess.run(None, feeds)[0]


def _qdq(x, s, z):
    return [h.make_node("QuantizeLinear", [x, s, z], [x + "_q"]), h.make_node("DequantizeLinear", [x + "_q", s, z], [x + "_d"])]


def _act(s, z, bits=8):
    return TensorQuant("activation", bits, False, scale=float(s), zero_point=int(z))


def _codes(y, s, z):
    return np.rint(y / s) + z


def test_conv_matches_qlinearconv_bit_for_bit():
    rng = np.random.default_rng(0)
    for _ in range(4):
        cin, cout = 32, 16
        sx, zx = f32(rng.uniform(0.01, 0.1)), np.uint8(rng.integers(0, 30))
        sw = rng.uniform(0.001, 0.02, cout).astype(f32)
        wq = rng.integers(-127, 128, (cout, cin, 3, 3)).astype(np.int8)
        bq = rng.integers(-5000, 5000, cout).astype(np.int32)
        sy, zy = f32(rng.uniform(0.05, 0.5)), np.uint8(rng.integers(0, 20))
        inits = dict(sx=sx, zx=zx, sw=sw, zw=np.zeros(cout, np.int8), wq=wq, sb=(sx * sw).astype(f32),
                     zb=np.zeros(cout, np.int32), bq=bq, sy=sy, zy=zy)
        nodes = _qdq("x", "sx", "zx") + [
            h.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w_d"], axis=0),
            h.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["b_d"], axis=0),
            h.make_node("Conv", ["x_d", "w_d", "b_d"], ["c"], pads=[1, 1, 1, 1])] + _qdq("c", "sy", "zy")
        nodes[-1].output[0] = "y"
        x = rng.normal(0, 2, (4, cin, 8, 8)).astype(f32)
        ref = _run(nodes, inits, {"x": x}, "QLinearConv")

        x_fq = fake_quant(torch.from_numpy(x), torch.tensor(sx), torch.tensor(float(zx)), 0, 255)
        w_fq = torch.from_numpy(wq.astype(f32) * sw.reshape(-1, 1, 1, 1))
        b_fq = torch.from_numpy(bq.astype(f32) * (sx * sw).astype(f32))
        w = TensorQuant("weight", 8, True, "per_channel", 0, tuple(float(v) for v in sw), (0,) * cout)
        conv = ExactConv("Conv", {"pads": [1, 1, 1, 1]}, _act(sx, zx), w, _act(sy, zy))
        y = conv(x_fq, w_fq, b_fq).numpy()
        np.testing.assert_array_equal(_codes(y, sy, zy), _codes(ref, sy, zy))


def test_add_matches_qlinearadd_exhaustively():
    """All 256 x 256 code pairs for several scale sets: the emulation agrees everywhere, while a
    float fake-quant (round of the exact sum) disagrees on some near-ties."""
    rng = np.random.default_rng(1)
    a_codes, b_codes = (c.reshape(1, -1).astype(f32) for c in np.meshgrid(np.arange(256), np.arange(256)))
    float_mismatches = 0
    for _ in range(16):
        sa, sb, sc = (f32(rng.uniform(lo, hi)) for lo, hi in ((0.01, 0.1), (0.01, 0.1), (0.02, 0.2)))
        za, zb, zc = (int(v) for v in rng.integers(0, 128, 3))
        inits = dict(sa=sa, za=np.uint8(za), sb=sb, zb=np.uint8(zb), sc=sc, zc=np.uint8(zc))
        nodes = _qdq("a", "sa", "za") + _qdq("b", "sb", "zb") + [h.make_node("Add", ["a_d", "b_d"], ["c"])] \
            + _qdq("c", "sc", "zc")
        nodes[-1].output[0] = "y"
        a, b = (a_codes - za) * sa, (b_codes - zb) * sb
        ref = _codes(_run(nodes, inits, {"a": a, "b": b}, "QLinearAdd"), sc, zc)
        y = ExactAdd(_act(sa, za), _act(sb, zb), _act(sc, zc))(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        np.testing.assert_array_equal(_codes(y, sc, zc), ref)
        exact_sum = (sa.astype(np.float64) * (a_codes - za) + sb * (b_codes - zb)) / sc
        float_mismatches += int((np.clip(np.rint(exact_sum) + zc, 0, 255) != ref).sum())
    assert float_mismatches > 0  # the test can tell the kernels apart


def test_global_average_pool_matches_qlinearglobalaveragepool():
    rng = np.random.default_rng(2)
    for hw in (7, 8, 16):
        sx, zx, sy, zy = f32(rng.uniform(0.01, 0.1)), int(rng.integers(0, 128)), f32(rng.uniform(0.01, 0.1)), \
            int(rng.integers(0, 128))
        codes = rng.integers(0, 256, (8, 64, hw, hw)).astype(f32)
        inits = dict(sx=sx, zx=np.uint8(zx), sy=sy, zy=np.uint8(zy))
        nodes = _qdq("x", "sx", "zx") + [h.make_node("GlobalAveragePool", ["x_d"], ["c"])] + _qdq("c", "sy", "zy")
        nodes[-1].output[0] = "y"
        x = (codes - zx) * sx
        ref = _codes(_run(nodes, inits, {"x": x}, "QLinearGlobalAveragePool"), sy, zy)
        y = ExactGlobalAveragePool(_act(sx, zx), _act(sy, zy))(torch.from_numpy(x)).numpy()
        np.testing.assert_array_equal(_codes(y, sy, zy), ref)


def test_gemm_matches_qgemm():
    rng = np.random.default_rng(3)
    k, n = 64, 10
    sx, zx = f32(0.05), 17
    sw = rng.uniform(0.001, 0.02, n).astype(f32)
    wq = rng.integers(-127, 128, (n, k)).astype(np.int8)
    bq = rng.integers(-5000, 5000, n).astype(np.int32)
    sy, zy = f32(0.11), 60
    inits = dict(sx=sx, zx=np.uint8(zx), sw=sw, zw=np.zeros(n, np.int8), wq=wq, sb=(sx * sw).astype(f32),
                 zb=np.zeros(n, np.int32), bq=bq, sy=sy, zy=np.uint8(zy))
    nodes = _qdq("x", "sx", "zx") + [
        h.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w_d"], axis=0),
        h.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["b_d"], axis=0),
        h.make_node("Gemm", ["x_d", "w_d", "b_d"], ["c"], transB=1)] + _qdq("c", "sy", "zy")
    nodes[-1].output[0] = "y"
    x = (rng.integers(0, 256, (2048, k)).astype(f32) - zx) * sx
    ref = _codes(_run(nodes, inits, {"x": x}, "QGemm"), sy, zy)
    w = TensorQuant("weight", 8, True, "per_channel", 0, tuple(float(v) for v in sw), (0,) * n)
    gemm = ExactConv("Gemm", {"transB": 1}, _act(sx, zx), w, _act(sy, zy))
    y = gemm(torch.from_numpy(x), torch.from_numpy(wq.astype(f32) * sw[:, None]),
             torch.from_numpy(bq.astype(f32) * (sx * sw).astype(f32))).numpy()
    np.testing.assert_array_equal(_codes(y, sy, zy), ref)


def test_overrides_only_run_in_eval_mode():
    from qtool.lift import lift

    x = h.make_tensor_value_info("x", T.FLOAT, [1, 4])
    g = h.make_graph([h.make_node("Add", ["x", "x"], ["y"])], "g", [x], [h.make_tensor_value_info("y", T.FLOAT, [1, 4])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    lifted = lift(m)

    class Zero(torch.nn.Module):
        def forward(self, a, b):
            return torch.zeros_like(a)

    lifted.set_eval_override("y", Zero())
    inp = torch.ones(1, 4)
    assert torch.equal(lifted.eval()(inp), torch.zeros(1, 4))
    assert torch.equal(lifted.train()(inp), 2 * inp)
    lifted.set_eval_override("y", None)
    assert torch.equal(lifted.eval()(inp), 2 * inp)
    from qtool.errors import QtoolError

    with pytest.raises(QtoolError, match="no step produces"):
        lifted.set_eval_override("nope", Zero())
    onnx.checker.check_model(m)
