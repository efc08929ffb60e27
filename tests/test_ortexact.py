"""qtool.ortexact against onnxruntime itself: each emulated kernel returns the codes ORT's optimized
QDQ group returns, on random and exhaustive inputs; the plain float fake-quant does not always.

Conv and Gemm run on this CPU's kernels: exact sums with VNNI, int16-saturated pairs without it
(qtool.ortkernels). Full-range codes make pairs saturate, and each such test also checks that the
other accumulation model disagrees with onnxruntime there: the test tells the two apart."""
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
from qtool.ortkernels import EXACT, accumulation, saturates
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


def _act(s, z, bits=8, signed=False):
    return TensorQuant("activation", bits, signed, scale=float(s), zero_point=int(z))


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
        # without VNNI the exact sum is off here: 10 codes of 4096, by up to 7, in the first round
        np.testing.assert_array_equal(_codes(y, sy, zy), _codes(ref, sy, zy))


def _per_channel(sw):
    return TensorQuant("weight", 8, True, "per_channel", 0, tuple(float(v) for v in sw), (0,) * len(sw))


def _mismatches(module, args, ref, sy, zy) -> int:
    return int((_codes(module(*args).numpy(), sy, zy) != ref).sum())


# cin, cout, kernel, attrs. Trailing numbers: output codes the exact sum gets wrong on an AVX2 CPU
# without VNNI (mismatched / all), i.e. what the emulation of saturating pairs fixes.
CONV_CASES = {
    "3x3": (32, 16, (3, 3), dict(pads=[1, 1, 1, 1])),  # MLAS's symmetric indirect conv (C % 4, M % 8 == 0); 1561/2048
    "1x1": (32, 16, (1, 1), {}),  # no im2col; 881/2048
    "first layer, cin 3": (3, 16, (3, 3), dict(pads=[1, 1, 1, 1])),  # K = 27: pairs straddle kernel taps; 647/2048
    "cin 5, cout 4": (5, 4, (3, 3), dict(pads=[1, 1, 1, 1])),  # im2col + QGEMM (M < 16), odd K; 245/512
    "stride 2": (16, 16, (3, 3), dict(pads=[1, 1, 1, 1], strides=[2, 2])),  # 381/512
    "asymmetric pads, dilation 2": (8, 16, (3, 3), dict(pads=[0, 1, 2, 1], dilations=[2, 2])),  # 543/1152
    "grouped": (8, 16, (3, 3), dict(pads=[1, 1, 1, 1], group=2)),  # K = 36 per group; 570/2048
    "depthwise": (16, 16, (3, 3), dict(pads=[1, 1, 1, 1], group=16)),  # exact on every CPU measured; 0
    "channel multiplier 2": (8, 16, (3, 3), dict(pads=[1, 1, 1, 1], group=8)),  # not depthwise: K = 9; 131/2048
    "1-D": (8, 16, (5,), dict(pads=[2, 2])),  # 113/256
    "3-D": (4, 8, (3, 3, 3), dict(pads=[1] * 6)),  # K = (kd, kh, kw, c); 4539/8192
    "int8 activations": (32, 16, (3, 3), dict(pads=[1, 1, 1, 1])),  # read as uint8 codes + 128; 1799/2048
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_full_range_codes_match_qlinearconv(case):
    """Uniform codes over the whole container and weights up to +-127: pairs of products overflow int16
    often. The emulation equals QLinearConv wherever the other accumulation model does not."""
    cin, cout, kernel, attrs = CONV_CASES[case]
    signed = case == "int8 activations"
    rng = np.random.default_rng(list(CONV_CASES).index(case))
    group = attrs.get("group", 1)
    lo, hi = (-128, 127) if signed else (0, 255)
    sx, zx = f32(0.03), int(rng.integers(-10, 10) if signed else rng.integers(0, 30))
    sw = rng.uniform(0.001, 0.02, cout).astype(f32)
    wq = rng.integers(-127, 128, (cout, cin // group, *kernel)).astype(np.int8)
    bq = rng.integers(-5000, 5000, cout).astype(np.int32)
    x = ((rng.integers(lo, hi + 1, (2, cin) + (8,) * len(kernel)) - zx) * sx).astype(f32)
    x_t, w_t = torch.from_numpy(x), torch.from_numpy(wq.astype(f32) * sw.reshape(-1, *(1,) * (len(kernel) + 1)))
    b_t = torch.from_numpy(bq.astype(f32) * (sx * sw).astype(f32))
    from qtool.lift_ops import run_op

    sy = f32(run_op("Conv", attrs, False, x_t, w_t, b_t).std() / 40)  # outputs mostly inside the code range
    zy = 0 if signed else 128
    dt = np.int8 if signed else np.uint8
    inits = dict(sx=sx, zx=dt(zx), sw=sw, zw=np.zeros(cout, np.int8), wq=wq, sb=(sx * sw).astype(f32),
                 zb=np.zeros(cout, np.int32), bq=bq, sy=sy, zy=dt(zy))
    nodes = _qdq("x", "sx", "zx") + [
        h.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w_d"], axis=0),
        h.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["b_d"], axis=0),
        h.make_node("Conv", ["x_d", "w_d", "b_d"], ["c"], **attrs)] + _qdq("c", "sy", "zy")
    nodes[-1].output[0] = "y"
    ref = _codes(_run(nodes, inits, {"x": x}, "QLinearConv"), sy, zy)
    args = (x_t, w_t, b_t)
    xq, yq = _act(sx, zx, signed=signed), _act(sy, zy, signed=signed)
    assert _mismatches(ExactConv("Conv", attrs, xq, _per_channel(sw), yq), args, ref, sy, zy) == 0
    kernel_name = "QLinearConv depthwise" if case == "depthwise" else "QLinearConv"
    if accumulation(kernel_name, signed) != EXACT:
        assert _mismatches(ExactConv("Conv", attrs, xq, _per_channel(sw), yq, saturate=False), args, ref, sy, zy) > 0
    elif case != "depthwise":  # where ORT sums exactly, MLAS's int16 pairs would be wrong here
        assert _mismatches(ExactConv("Conv", attrs, xq, _per_channel(sw), yq, saturate=True), args, ref, sy, zy) > 0


def _brute_force_pairs(u, z_u, wq, attrs):
    """Every product formed, K ordered (*kernel, c) per group, pairs saturated to int16: MLAS without VNNI."""
    nd = wq.ndim - 2
    kernel, group = wq.shape[2:], attrs.get("group", 1)
    pads, strides = attrs.get("pads", [0] * 2 * nd), attrs.get("strides", [1] * nd)
    dil = attrs.get("dilations", [1] * nd)
    u = np.pad(u.astype(np.int64), [(0, 0), (0, 0)] + list(zip(pads[:nd], pads[nd:])), constant_values=z_u)
    window = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    win = np.lib.stride_tricks.sliding_window_view(u, window, axis=range(2, 2 + nd))
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
              + tuple(slice(None, None, d) for d in dil)]  # N, C, *out, *kernel
    out_shape = win.shape[2:2 + nd]
    cg, og = wq.shape[1], wq.shape[0] // group
    accs = []
    for g in range(group):
        a = np.moveaxis(win[:, g * cg:(g + 1) * cg], 1, -1).reshape(u.shape[0], -1, int(np.prod(kernel)) * cg)
        w = np.moveaxis(wq[g * og:(g + 1) * og].astype(np.int64), 1, -1).reshape(og, -1)
        prod = a[:, :, None, :] * w[None, None]  # N, L, og, K
        if prod.shape[-1] % 2:
            prod = np.concatenate([prod, np.zeros(prod.shape[:-1] + (1,), np.int64)], -1)
        pairs = np.clip(prod.reshape(*prod.shape[:-1], -1, 2).sum(-1), -32768, 32767)
        accs.append(pairs.sum(-1) - z_u * w.sum(1))
    return np.moveaxis(np.concatenate(accs, -1), -1, 1).reshape(u.shape[0], -1, *out_shape)


@pytest.mark.parametrize("case", [c for c in CONV_CASES if c != "depthwise"])
def test_emulated_pairs_equal_a_brute_force_sum(case):
    """The emulation adds the saturation of only the pairs that can saturate to the exact sum: on every
    CPU it equals forming every product and saturating every pair."""
    cin, cout, kernel, attrs = CONV_CASES[case]
    signed = case == "int8 activations"
    rng = np.random.default_rng(100 + list(CONV_CASES).index(case))
    wq = rng.integers(-127, 128, (cout, cin // attrs.get("group", 1), *kernel))
    wq[0] = 127  # every pair of output channel 0 can saturate
    codes = rng.integers(-128 if signed else 0, 128 if signed else 256, (2, cin) + (7,) * len(kernel))
    zx, zy = (-5 if signed else 20), (0 if signed else 128)
    shift = 128 if signed else 0  # MLAS reads int8 codes as uint8 codes + 128
    acc = _brute_force_pairs(codes + shift, zx + shift, wq, attrs)
    sx, sy = f32(1.0), f32(acc.std() / 40)  # outputs mostly inside the code range
    lo, hi = (-128, 127) if signed else (0, 255)
    want = np.clip(np.rint(acc.astype(f32) * f32(sx / sy)) + zy, lo, hi)
    x, w = torch.from_numpy((codes - zx).astype(f32)), torch.from_numpy(wq.astype(f32))
    xq, wt, yq = _act(sx, zx, signed=signed), _per_channel(np.ones(cout, f32)), _act(sy, zy, signed=signed)
    emulated = _codes(ExactConv("Conv", attrs, xq, wt, yq, saturate=True)(x, w).numpy(), sy, zy)
    np.testing.assert_array_equal(emulated, want)
    exact = _codes(ExactConv("Conv", attrs, xq, wt, yq, saturate=False)(x, w).numpy(), sy, zy)
    assert (exact != want).any()


@pytest.mark.parametrize("k", [64, 63])
def test_emulated_gemm_pairs_equal_a_brute_force_sum(k):
    rng = np.random.default_rng(k)
    codes, wq, zx = rng.integers(0, 256, (300, k)), rng.integers(-127, 128, (10, k)), 17
    prod = codes[:, None, :] * wq[None]  # M, N, K
    if k % 2:
        prod = np.concatenate([prod, np.zeros(prod.shape[:-1] + (1,), prod.dtype)], -1)
    acc = np.clip(prod.reshape(300, 10, -1, 2).sum(-1), -32768, 32767).sum(-1) - zx * wq.sum(1)
    sy = f32(acc.std() / 40)
    want = np.clip(np.rint(acc.astype(f32) * f32(1 / sy)) + 128, 0, 255)
    gemm = ExactConv("Gemm", {"transB": 1}, _act(1.0, zx), _per_channel(np.ones(10, f32)), _act(sy, 128), saturate=True)
    y = gemm(torch.from_numpy((codes - zx).astype(f32)), torch.from_numpy(wq.astype(f32))).numpy()
    np.testing.assert_array_equal(_codes(y, sy, 128), want)


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


@pytest.mark.parametrize("m,k,signed,trans_b", [(2048, 64, False, 1), (256, 63, False, 1), (1, 64, False, 1),
                                               (256, 64, True, 1), (256, 64, False, 0)],
                         ids=["k64", "odd-k", "one-row", "int8-activations", "weight-KxN"])
def test_gemm_matches_qgemm(m, k, signed, trans_b):
    """Full-range codes; without VNNI the exact sum is off at 5779 of 20480 codes (k64), 810/2560 (odd K:
    the last element pairs with 0), 2/10 (one row: MLAS's GEMV kernel), 1051/2560 (int8 activations)."""
    rng = np.random.default_rng(3)
    n = 10
    lo, hi = (-128, 127) if signed else (0, 255)
    sx, zx = f32(0.05), (-3 if signed else 17)
    sw = rng.uniform(0.001, 0.02, n).astype(f32)
    wq = rng.integers(-127, 128, (n, k)).astype(np.int8)
    bq = rng.integers(-5000, 5000, n).astype(np.int32)
    sy, zy = f32(0.11), (-68 if signed else 60)
    dt = np.int8 if signed else np.uint8
    inits = dict(sx=sx, zx=dt(zx), sw=sw, zw=np.zeros(n, np.int8), wq=wq, sb=(sx * sw).astype(f32),
                 zb=np.zeros(n, np.int32), bq=bq, sy=sy, zy=dt(zy))
    if not trans_b:  # the weight stored K x N (a fused MatMul + Add), per-channel on axis 1
        inits["wq"] = np.ascontiguousarray(wq.T)
    nodes = _qdq("x", "sx", "zx") + [
        h.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w_d"], axis=1 - trans_b),
        h.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["b_d"], axis=0),
        h.make_node("Gemm", ["x_d", "w_d", "b_d"], ["c"], transB=trans_b)] + _qdq("c", "sy", "zy")
    nodes[-1].output[0] = "y"
    x = (rng.integers(lo, hi + 1, (m, k)).astype(f32) - zx) * sx
    ref = _codes(_run(nodes, inits, {"x": x}, "QGemm"), sy, zy)
    w = wq.astype(f32) * sw[:, None]
    args = (torch.from_numpy(x), torch.from_numpy(w if trans_b else np.ascontiguousarray(w.T)),
            torch.from_numpy(bq.astype(f32) * (sx * sw).astype(f32)))
    xq, yq = _act(sx, zx, signed=signed), _act(sy, zy, signed=signed)
    assert _mismatches(ExactConv("Gemm", {"transB": trans_b}, xq, _per_channel(sw), yq), args, ref, sy, zy) == 0
    other = ExactConv("Gemm", {"transB": trans_b}, xq, _per_channel(sw), yq, saturate=not saturates("QGemm", signed))
    assert _mismatches(other, args, ref, sy, zy) > 0  # the other accumulation model is wrong here


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


class _Fixed(torch.nn.Module):
    """A fake-quant with fixed scale (per tensor or per output channel) and zero point."""

    def __init__(self, s, z, qmin, qmax, axis=None):
        super().__init__()
        self.s, self.z, self.qmin, self.qmax, self.axis = torch.tensor(s), torch.tensor(z), qmin, qmax, axis

    def forward(self, x):
        return fake_quant(x, self.s, self.z, self.qmin, self.qmax, self.axis)


@pytest.mark.parametrize("hi,absorbed", [(6.0, True), (5.0, False), (None, True)])
def test_conv_relu6_clip_runs_as_qlinearconv_when_onnxruntime_drops_the_clip(hi, absorbed):
    """Conv -> Clip(0, 6) -> Q: ORT removes the Clip when its range holds the Q's whole range and runs
    QLinearConv; the emulation then covers the conv. A narrower Clip stays a float op in both."""
    from qtool.lift import lift
    from qtool.ortexact import install_exact_eval
    from qtool.ortgraph import integer_kernel_report

    rng = np.random.default_rng(5)
    cin, cout = 8, 6
    sx, sy = f32(0.05), f32(6.0 / 255)
    sw = rng.uniform(0.002, 0.01, cout).astype(f32)
    wq = rng.integers(-127, 128, (cout, cin, 3, 3)).astype(np.int8)
    bq = rng.integers(-3000, 3000, cout).astype(np.int32)
    x = (rng.integers(0, 256, (4, cin, 9, 9)) * sx).astype(f32)
    clip_in = ["c", "lo", "hi"] if hi is not None else ["c", "lo"]
    inits = {"w": (wq.astype(f32) * sw[:, None, None, None]), "b": (bq * (sx * sw)).astype(f32), "lo": f32(0.0)}
    if hi is not None:
        inits["hi"] = f32(hi)
    float_graph = h.make_model(h.make_graph(
        [h.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), h.make_node("Clip", clip_in, ["y"])], "g",
        [h.make_tensor_value_info("x", T.FLOAT, list(x.shape))], [h.make_tensor_value_info("y", T.FLOAT, None)],
        [nh.from_array(np.asarray(v), k) for k, v in inits.items()]), opset_imports=[h.make_opsetid("", 17)])
    # The QDQ graph the exporter writes for it.
    qinits = {"sx": sx, "zx": np.uint8(0), "sw": sw, "zw": np.zeros(cout, np.int8), "wq": wq, "bq": bq,
              "sb": (sx * sw).astype(f32), "zb": np.zeros(cout, np.int32), "sy": sy, "zy": np.uint8(0),
              "lo": f32(0.0), **({"hi": f32(hi)} if hi is not None else {})}
    nodes = _qdq("x", "sx", "zx") + [
        h.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w_d"], axis=0),
        h.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["b_d"], axis=0),
        h.make_node("Conv", ["x_d", "w_d", "b_d"], ["c"], pads=[1, 1, 1, 1]),
        h.make_node("Clip", ["c"] + clip_in[1:], ["cl"]),
        h.make_node("QuantizeLinear", ["cl", "sy", "zy"], ["yq"]), h.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, list(x.shape))],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], [nh.from_array(np.asarray(v), k) for k, v in qinits.items()])
    qdq = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    qdq.ir_version = 8
    assert ("QLinearConv" in str(integer_kernel_report(qdq).op_histogram)) == absorbed
    ref = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    lifted = lift(float_graph)
    tq = {"x": _act(sx, 0), "y": _act(sy, 0),
          "w": _per_channel(sw)}
    lifted.set_quantizer("x", _Fixed(sx, 0.0, 0, 255))
    lifted.set_quantizer("w", _Fixed(sw, np.zeros(cout, f32), -128, 127, axis=0))
    lifted.set_quantizer("b", _Fixed((sx * sw).astype(f32), np.zeros(cout, f32), -2**31, 2**31 - 1, axis=0))
    lifted.set_quantizer("y", _Fixed(sy, 0.0, 0, 255))
    done = install_exact_eval(lifted, tq.get, lambda m: None)
    assert done == (["c"] if absorbed else [])
    with torch.no_grad():
        y = lifted.eval()(torch.from_numpy(x)).numpy()
    assert np.array_equal(_codes(y, sy, 0), _codes(ref, sy, 0))


@pytest.mark.parametrize("signed,axis,d,p_max", [(False, -1, 64, 0.93), (False, 1, 50, 0.93), (True, -1, 197, 0.93),
                                                 (False, -1, 7, 0.93), (False, -1, 65, 0.0225)])
def test_softmax_matches_qlinearsoftmax(signed, axis, d, p_max):
    """DQ -> Softmax -> Q runs as com.microsoft QLinearSoftmax; the float softmax of the dequantized
    codes is off by a code on some elements, ExactSoftmax on none."""
    from qtool.ortexact import ExactSoftmax

    rng = np.random.default_rng(d)
    lo, hi = (-128, 127) if signed else (0, 255)
    dt = np.int8 if signed else np.uint8
    shape = [3, d, 16] if axis == 1 else [2, 4, 16, d]
    # p_max 0.0225: near-uniform attention over 65 tokens (a random-weight ViT), a tiny output scale
    x = rng.normal(0, 3 if p_max > 0.5 else 0.1, shape).astype(f32)
    sx, zx = f32(0.05 if p_max > 0.5 else 0.0027), dt(rng.integers(lo + 100, hi - 100))
    sy, zy = f32(p_max / 255), dt(lo)  # a calibrated range [0, 0.93]: floor(1 / s_y) = 274, not 274.19
    inits = dict(sx=np.array(sx), zx=np.array(zx), sy=np.array(sy), zy=np.array(zy))
    nodes = _qdq("x", "sx", "zx") + [h.make_node("Softmax", ["x_d"], ["p"], axis=axis)] + _qdq("p", "sy", "zy")
    nodes[-1].output[0] = "y"
    ref = _codes(_run(nodes, inits, {"x": x}, "QLinearSoftmax"), sy, zy)

    x_fq = fake_quant(torch.from_numpy(x), torch.tensor(sx), torch.tensor(float(zx)), lo, hi)
    sm = ExactSoftmax(axis, _act(sx, zx, signed=signed), _act(sy, zy, signed=signed))
    np.testing.assert_array_equal(_codes(sm(x_fq).numpy(), sy, zy), ref)
    plain = (torch.round(torch.softmax(x_fq, axis) / torch.tensor(sy)) + float(zy)).clamp(lo, hi)
    assert (plain.numpy() != ref).any()  # the float path is what the emulation fixes


@pytest.mark.parametrize("weight", [False, True])
def test_matmul_matches_qlinearmatmul(weight, monkeypatch):
    """Two quantized activations (attention's P V: uint8 x uint8) and a full-range int8 weight with
    per-column scales (uint8 x int8: int16-saturated pairs without VNNI) run as QLinearMatMul."""
    from qtool.ortexact import ExactMatMul

    rng = np.random.default_rng(7 + weight)
    k, n = 64, 24
    sa, za = f32(0.02), np.uint8(3)
    # activations: small codes and M = s_a s_b / s_y = 1/2, so exact sums land on rounding ties often
    sy, zy = (f32(0.9), np.uint8(120)) if weight else (f32(0.02 * 0.01 * 2), np.uint8(0))
    a = (rng.integers(0, 4, (2, 3, 16, k)) * sa).astype(f32) if not weight else \
        rng.uniform(-0.05, 5.0, (2, 3, 16, k)).astype(f32)
    inits = dict(sa=np.array(sa), za=np.array(za), sy=np.array(sy), zy=np.array(zy))
    if weight:
        bq = rng.choice([-127, -126, 125, 127, -3, 0, 5], (k, n)).astype(np.int8)
        sb = rng.uniform(0.001, 0.003, n).astype(f32)
        inits.update(bq=bq, sb=sb, zb=np.zeros(n, np.int8))
        nodes = _qdq("a", "sa", "za") + [h.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["b_d"], axis=1)]
        feeds = {"a": a}
        b_fq = torch.from_numpy(bq.astype(f32) * sb)
        bt = TensorQuant("weight", 8, True, "per_channel", 1, tuple(float(v) for v in sb), (0,) * n)
    else:
        sb, zb = f32(0.01), np.uint8(0)
        b = ((rng.integers(0, 4, (2, 3, k, n)) - 0) * sb).astype(f32)
        inits.update(sb=np.array(sb), zb=np.array(zb))
        nodes = _qdq("a", "sa", "za") + _qdq("b", "sb", "zb")
        feeds = {"a": a, "b": b}
        b_fq = fake_quant(torch.from_numpy(b), torch.tensor(sb), torch.tensor(float(zb)), 0, 255)
        bt = _act(sb, zb)
    nodes += [h.make_node("MatMul", ["a_d", "b_d"], ["c"])] + _qdq("c", "sy", "zy")
    nodes[-1].output[0] = "y"
    ref = _codes(_run(nodes, inits, feeds, "QLinearMatMul"), sy, zy)
    a_fq = fake_quant(torch.from_numpy(a), torch.tensor(sa), torch.tensor(float(za)), 0, 255)
    mm = ExactMatMul(_act(sa, za), bt, _act(sy, zy), b_is_weight=weight)
    np.testing.assert_array_equal(_codes(mm(a_fq, b_fq).numpy(), sy, zy), ref)
    if not weight:
        plain = (torch.round(torch.matmul(a_fq, b_fq) / torch.tensor(sy)) + float(zy)).clamp(0, 255)
        assert (plain.numpy() != ref).any()  # float sums move codes: the emulation is needed
        return
    # The weight's full-range pairs saturate int16 where onnxruntime sums pairs (x86 without VNNI, an AMD
    # EPYC here) and not where it sums exactly (an Intel Xeon with VNNI): the other CPU's model moves codes.
    import qtool.ortexact as ox
    from qtool.ortkernels import EXACT, PAIRS

    here = ox.accumulation("QGemm", False)
    monkeypatch.setattr(ox, "accumulation", lambda kernel, signed=False: EXACT if here == PAIRS else PAIRS)
    assert (_codes(mm(a_fq, b_fq).numpy(), sy, zy) != ref).any()


def test_sigmoid_matches_qlinearsigmoid_exhaustively():
    """Every input code at 12 random scales: ExactLookup is onnxruntime's QLinearSigmoid table (MLAS's
    logistic approximation), read by code."""
    from qtool.ortexact import ExactLookup

    rng = np.random.default_rng(11)
    for _ in range(12):
        sx, zx = f32(rng.uniform(0.01, 0.1)), np.uint8(rng.integers(60, 200))
        sy, zy = f32(rng.uniform(0.9, 1.0) / 255), np.uint8(0)
        x = ((np.arange(256) - int(zx)) * sx).astype(f32).reshape(1, 256)
        inits = dict(sx=np.array(sx), zx=np.array(zx), sy=np.array(sy), zy=np.array(zy))
        nodes = _qdq("x", "sx", "zx") + [h.make_node("Sigmoid", ["x_d"], ["s"])] + _qdq("s", "sy", "zy")
        nodes[-1].output[0] = "y"
        ref = _codes(_run(nodes, inits, {"x": x}, "QLinearSigmoid"), sy, zy)
        lut = ExactLookup("Sigmoid", _act(sx, zx), _act(sy, zy))
        np.testing.assert_array_equal(_codes(lut(torch.from_numpy(x)).numpy(), sy, zy), ref)


@pytest.mark.parametrize("broadcast", [False, True])
def test_mul_matches_qlinearmul(broadcast):
    """All code pairs (SiLU's x * sigmoid(x)) at 6 random scales, and a per-channel gate broadcast over
    H, W (squeeze-excite)."""
    from qtool.ortexact import ExactMul

    rng = np.random.default_rng(12 + broadcast)
    codes = np.arange(256)
    for _ in range(6):
        sa, za, sb, zb = f32(rng.uniform(0.01, 0.05)), np.uint8(rng.integers(40, 120)), f32(1 / 255), np.uint8(0)
        sy, zy = f32(rng.uniform(0.01, 0.03)), np.uint8(rng.integers(0, 60))
        if broadcast:
            a = ((rng.integers(0, 256, (2, 8, 5, 5)) - int(za)) * sa).astype(f32)
            b = ((rng.integers(0, 256, (2, 8, 1, 1)) - int(zb)) * sb).astype(f32)
        else:
            a = ((np.repeat(codes, 256) - int(za)) * sa).astype(f32).reshape(256, 256)
            b = ((np.tile(codes, 256) - int(zb)) * sb).astype(f32).reshape(256, 256)
        inits = dict(sa=np.array(sa), za=np.array(za), sb=np.array(sb), zb=np.array(zb), sy=np.array(sy),
                     zy=np.array(zy))
        nodes = _qdq("a", "sa", "za") + _qdq("b", "sb", "zb") + [h.make_node("Mul", ["a_d", "b_d"], ["c"])] \
            + _qdq("c", "sy", "zy")
        nodes[-1].output[0] = "y"
        ref = _codes(_run(nodes, inits, {"a": a, "b": b}, "QLinearMul"), sy, zy)
        mul = ExactMul(_act(sa, za), _act(sb, zb), _act(sy, zy))
        np.testing.assert_array_equal(_codes(mul(torch.from_numpy(a), torch.from_numpy(b)).numpy(), sy, zy), ref)


def test_softmax_override_pickles_and_copies():
    import copy
    import pickle

    from qtool.ortexact import ExactSoftmax

    sm = ExactSoftmax(-1, _act(0.05, 100), _act(1 / 256, 0))
    x = torch.randn(2, 3, 8)
    y = sm(x)
    for clone in (copy.deepcopy(sm), pickle.loads(pickle.dumps(sm))):
        assert torch.equal(clone(x), y)


def test_layernorm_runs_as_onnxruntime_computes_it():
    """onnxruntime's LayerNormalization kernel sums in its own order: torch's layer_norm differs from it
    in the last bit on about a third of the elements, and where such an output sits on a rounding tie
    of the Q after it the code flips (about 1e-5 of the zoo ViT's LayerNorm outputs after QAT). OrtFloatOp
    returns onnxruntime's values bit for bit."""
    from qtool.lift_ops import run_op
    from qtool.ortexact import OrtFloatOp

    rng = np.random.default_rng(4)
    d = 192
    x = (np.round(rng.normal(0, 1, (4, 197, d)) / 0.02) * 0.02).astype(f32)  # dequantized codes, as in QAT
    gamma, beta = rng.uniform(0.5, 1.5, d).astype(f32), rng.uniform(-0.1, 0.1, d).astype(f32)
    g = h.make_graph([h.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-6)], "ln",
                     [h.make_tensor_value_info("x", T.FLOAT, list(x.shape))], [h.make_tensor_value_info("y", T.FLOAT, None)],
                     [nh.from_array(gamma, "g"), nh.from_array(beta, "b")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    args = (torch.from_numpy(x), torch.from_numpy(gamma), torch.from_numpy(beta))
    ln = OrtFloatOp("LayerNormalization", {"axis": -1, "epsilon": 1e-6})
    np.testing.assert_array_equal(ln(*args).numpy(), ref)
    plain = run_op("LayerNormalization", {"axis": -1, "epsilon": 1e-6, "_n_outputs": 1}, False, *args).numpy()
    assert (plain != ref).mean() > 0.05
