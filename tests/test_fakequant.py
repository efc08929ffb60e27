"""Fake-quant modules vs onnxruntime's QuantizeLinear/DequantizeLinear, bit for bit."""
from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qtool.errors import QtoolError
from qtool.fakequant import (BNNWeightFakeQuant, DoReFaWeightFakeQuant, EMAFakeQuant, LSQFakeQuant, MinMaxFakeQuant, PACTFakeQuant, QParams, fake_quant, int_range)

# Native ORT integer types by (bits, signed) -> (TensorProto type, opset that introduced it).
NATIVE = {
    (8, True): (TensorProto.INT8, 13), (8, False): (TensorProto.UINT8, 13),
    (4, True): (TensorProto.INT4, 21), (4, False): (TensorProto.UINT4, 21),
    (2, True): (TensorProto.INT2, 25), (2, False): (TensorProto.UINT2, 25),
}


def _session(nodes, inits, opset):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_qdq(x: np.ndarray, scale, zp, bits: int, signed: bool, axis: int | None, clip=None) -> np.ndarray:
    """Run x through [Clip ->] QuantizeLinear -> DequantizeLinear on ORT; container int8/uint8
    when the b-bit type is not native."""
    qtype, opset = NATIVE.get((bits, signed), (TensorProto.INT8 if signed else TensorProto.UINT8, 13))
    scale = np.asarray(scale, np.float32)
    zp = np.asarray(zp, np.int64)
    inits = [numpy_helper.from_array(scale, "s"),
             helper.make_tensor("z", qtype, zp.shape, zp.reshape(-1).tolist())]
    nodes, src = [], "x"
    if clip is not None:
        lo, hi = clip
        # Clip's min/max are scalars: per-channel clips become Max/Min with broadcast tensors.
        shape = [1] * x.ndim
        if np.ndim(lo):
            shape[axis] = -1
        inits += [numpy_helper.from_array(np.asarray(lo, np.float32).reshape(shape), "lo"),
                  numpy_helper.from_array(np.asarray(hi, np.float32).reshape(shape), "hi")]
        nodes += [helper.make_node("Max", ["x", "lo"], ["xl"]), helper.make_node("Min", ["xl", "hi"], ["xc"])]
        src = "xc"
    kw = {} if axis is None else {"axis": axis}
    nodes += [helper.make_node("QuantizeLinear", [src, "s", "z"], ["q"], **kw),
              helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **kw)]
    return _session(nodes, inits, opset).run(None, {"x": x})[0]


def ort_dq(codes: np.ndarray, qp: QParams) -> np.ndarray:
    """DequantizeLinear of integer codes stored in an int8/uint8 initializer (the weight path)."""
    inits = [numpy_helper.from_array(codes, "q"), numpy_helper.from_array(qp.scale, "s"),
             numpy_helper.from_array(qp.zero_point, "z")]
    kw = {} if qp.axis is None else {"axis": qp.axis}
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], **kw),
             helper.make_node("Add", ["d", "x"], ["y"])]
    return _session(nodes, inits, 13).run(None, {"x": np.zeros(1, np.float32)})[0]


def _data(rng, shape, scale_hint: float) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(scale_hint)
    return x


def _ties(scale: float, qmin: int, qmax: int, zp: int, n: int) -> np.ndarray:
    """Values exactly halfway between two codes (exact in float32 for power-of-two scales)."""
    k = np.arange(qmin - zp - 2, qmax - zp + 2, dtype=np.float32)
    return np.resize((k + np.float32(0.5)) * np.float32(scale), n).astype(np.float32)


@pytest.mark.parametrize("bits,signed", sorted(NATIVE))
@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quant_bit_exact_vs_ort_native_types(bits, signed, per_channel):
    rng = np.random.default_rng(bits * 10 + signed + 2 * per_channel)
    qmin, qmax = int_range(bits, signed)
    C = 5
    x = _data(rng, (3, C, 7, 9), 1.0)
    if per_channel:
        scale = np.concatenate([rng.uniform(0.005, 0.3, C - 1), [2.0 ** -3]]).astype(np.float32)
        zp = rng.integers(qmin, qmax + 1, C)
        # A power-of-two channel gets exact ties on top of the random data.
        x[:, -1].reshape(-1)[:] = _ties(2.0 ** -3, qmin, qmax, int(zp[-1]), x[:, -1].size)
        axis = 1
    else:
        scale, zp, axis = np.float32(2.0 ** -4), np.int64(rng.integers(qmin, qmax + 1)), None
        flat = x.reshape(-1)
        flat[: flat.size // 2] = _ties(float(scale), qmin, qmax, int(zp), flat.size // 2)
    ref = ort_qdq(x, scale, zp, bits, signed, axis)
    y = fake_quant(torch.from_numpy(x), torch.tensor(scale), torch.tensor(zp, dtype=torch.float32),
                   qmin, qmax, axis).numpy()
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, ref)


def test_division_not_reciprocal_matches_ort():
    """ORT divides by the scale: find inputs where x * (1/s) rounds differently and check ORT."""
    s = np.float32(1 / 3)
    # Near-ties (a few ulps around (k + 0.5) * s) are where the two orders round differently.
    mid = ((np.arange(-128, 128, dtype=np.float32) + np.float32(0.5)) * s).astype(np.float32)
    x = np.concatenate([mid + np.spacing(mid) * np.float32(u) for u in range(-4, 5)]).astype(np.float32)
    by_div = np.rint(x / s)
    by_mul = np.rint(x * (np.float32(1) / s))
    differ = x[by_div != by_mul]
    assert differ.size > 0, "no discriminating input found; widen the search"
    ref = ort_qdq(differ, s, 0, 8, True, None)
    y = fake_quant(torch.from_numpy(differ), torch.tensor(s), torch.tensor(0.0), -128, 127).numpy()
    np.testing.assert_array_equal(y, ref)
    assert not np.array_equal((np.clip(by_mul[by_div != by_mul], -128, 127) * s).astype(np.float32), ref)


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7])
@pytest.mark.parametrize("signed", [True, False])
def test_sub8_activation_in_container_with_clip(bits, signed):
    """b < 8 in an int8/uint8 container: Clip(clip_range) before Q makes ORT equal the fake-quant."""
    fq = MinMaxFakeQuant(bits=bits, signed=signed)
    rng = np.random.default_rng(bits)
    calib = torch.from_numpy(_data(rng, (4, 64), 1.0) + (0 if signed else 0.5))
    fq.train()(calib)
    fq.eval()
    x = _data(rng, (8, 64), 3.0)  # well outside the calibrated range: saturation matters
    qp = fq.qparams()
    y = fq(torch.from_numpy(x)).numpy()
    container_bits = 8  # force the container path even where a native type exists
    ref = ort_qdq(x, qp.scale, qp.zero_point, container_bits, signed, None, clip=fq.clip_range())
    np.testing.assert_array_equal(y, ref)
    # Without the Clip the container saturates at its own range: values differ beyond the b-bit range.
    unclipped = ort_qdq(x, qp.scale, qp.zero_point, container_bits, signed, None)
    assert not np.array_equal(y, unclipped)
    inside = (x >= fq.clip_range()[0]) & (x <= fq.clip_range()[1])
    np.testing.assert_array_equal(y[inside], unclipped[inside])


def _act_quantizers():
    return [
        ("minmax_u8", MinMaxFakeQuant(8, signed=False)),
        ("minmax_s4_sym", MinMaxFakeQuant(4, signed=True, symmetric=True)),
        ("ema_u6", EMAFakeQuant(6, signed=False, decay=0.9)),
        ("lsq_s8", LSQFakeQuant(8, signed=True)),
        ("lsq_u3", LSQFakeQuant(3, signed=False)),
        ("pact_u4", PACTFakeQuant(4, alpha=2.5)),
        ("pact_u8", PACTFakeQuant(8, alpha=3.0)),
    ]


@pytest.mark.parametrize("name,fq", _act_quantizers(), ids=lambda v: v if isinstance(v, str) else "")
def test_activation_quantizers_equal_ort_qdq(name, fq):
    rng = np.random.default_rng(len(name))
    for _ in range(3):
        fq.train()(torch.from_numpy(_data(rng, (4, 3, 5, 5), 1.5)))
    fq.eval()
    x = _data(rng, (4, 3, 5, 5), 2.0)
    y = fq(torch.from_numpy(x)).detach().numpy()
    qp = fq.qparams()
    scale, zp, bits, signed, axis = qp  # the documented 5-tuple
    native = (bits, signed) in NATIVE
    ref = ort_qdq(x, scale, zp, bits, signed, axis, clip=None if native else fq.clip_range())
    np.testing.assert_array_equal(y, ref)


def _weight_quantizers():
    return [
        ("minmax_s8_pc", MinMaxFakeQuant(8, signed=True, axis=0, symmetric=True, narrow_range=True)),
        ("minmax_s5_pc", MinMaxFakeQuant(5, signed=True, axis=0, symmetric=True)),
        ("lsq_s4_pc", LSQFakeQuant(4, signed=True, axis=0, num_channels=6)),
        ("lsq_s2", LSQFakeQuant(2, signed=True)),
        ("dorefa_4", DoReFaWeightFakeQuant(4)),
        ("dorefa_2", DoReFaWeightFakeQuant(2)),
        ("dorefa_8", DoReFaWeightFakeQuant(8)),
        ("bnn", BNNWeightFakeQuant(axis=0)),
    ]


@pytest.mark.parametrize("name,fq", _weight_quantizers(), ids=lambda v: v if isinstance(v, str) else "")
def test_weight_codes_dequantize_to_fake_quant_exactly(name, fq):
    rng = np.random.default_rng(len(name) + 3)
    w = torch.from_numpy(_data(rng, (6, 4, 3, 3), 0.2))
    fq.train()(w)
    fq.eval()
    y = fq(w).detach().numpy()
    qp = fq.qparams()
    codes = fq.quantize_codes(w)
    assert codes.dtype == (np.int8 if qp.signed else np.uint8)
    assert codes.min() >= qp.qmin and codes.max() <= qp.qmax
    np.testing.assert_array_equal(ort_dq(codes, qp), y)
    # A QDQ on the fake-quantized float weight reproduces it too (re-quantization is exact).
    np.testing.assert_array_equal(ort_qdq(y, qp.scale, qp.zero_point, 8, qp.signed, qp.axis), y)


def test_qparams_mappings():
    pact = PACTFakeQuant(4, alpha=3.0)
    qp = pact.qparams()
    assert qp.scale == np.float32(3.0) / np.float32(15) and qp.zero_point == 0 and not qp.signed
    assert qp.zero_point.dtype == np.uint8
    d = DoReFaWeightFakeQuant(3).qparams()
    assert d.scale == np.float32(1 / 3) and (d.qmin, d.qmax) == (-3, 3) and d.signed
    w = torch.tensor([[0.5, -0.1, 0.3], [-2.0, 1.0, 0.0]])
    bnn = BNNWeightFakeQuant(axis=0)
    y = bnn(w)
    qp = bnn.qparams()
    assert qp.bits == 1 and (qp.qmin, qp.qmax) == (-1, 1) and qp.axis == 0
    np.testing.assert_allclose(qp.scale, [0.3, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(np.sign(y.detach().numpy()), [[1, -1, 1], [-1, 1, 1]])
    mm = MinMaxFakeQuant(8, signed=False)
    mm.train()(torch.tensor([-1.0, 3.0]))
    qp = mm.qparams()
    assert qp.scale == np.float32(4.0) / np.float32(255) and qp.zero_point == 64  # round(1/(4/255)) = 64


def test_minmax_ste_zero_outside_range():
    fq = MinMaxFakeQuant(4, signed=True, symmetric=True)
    fq.train()(torch.tensor([-1.0, 1.0]))
    fq.eval()
    x = torch.tensor([-3.0, -0.5, 0.0, 0.4, 0.99, 1.2, 5.0], requires_grad=True)
    fq(x).sum().backward()
    lo, hi = fq.clip_range()
    inside = ((x.detach() >= float(lo) - float(fq.qparams().scale) / 2)
              & (x.detach() <= float(hi) + float(fq.qparams().scale) / 2)).float()
    assert torch.equal(x.grad, inside)
    assert x.grad[0] == 0 and x.grad[-1] == 0 and x.grad[2] == 1


def test_lsq_scale_gradient_and_grad_scale():
    fq = LSQFakeQuant(4, signed=True, init_scale=0.1)
    x = torch.tensor([0.04, 0.26, -0.33, 2.0, -5.0], requires_grad=True)
    y = fq.train()(x)
    y.sum().backward()
    v = x.detach() / 0.1
    qmax, qmin = 7, -8
    expected = torch.where(v.round() > qmax, torch.tensor(float(qmax)),
                           torch.where(v.round() < qmin, torch.tensor(float(qmin)), v.round() - v)).sum()
    g = 1 / math.sqrt(x.numel() * qmax)
    assert fq.scale.grad is not None and fq.scale.grad.abs() > 0
    torch.testing.assert_close(fq.scale.grad, expected * g, rtol=1e-5, atol=1e-7)
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))


def test_lsq_per_channel_init_and_grad():
    fq = LSQFakeQuant(4, signed=True, axis=0, num_channels=3)
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    fq.train()(w).pow(2).sum().backward()
    torch.testing.assert_close(fq.scale.detach(), 2 * w.abs().mean(1) / math.sqrt(7))
    assert fq.scale.grad.shape == (3,) and (fq.scale.grad != 0).all()


def test_pact_alpha_gradient_counts_saturated():
    fq = PACTFakeQuant(4, alpha=1.0)
    x = torch.tensor([-1.0, 0.2, 0.7, 1.0, 1.5, 3.0], requires_grad=True)
    fq.train()(x).sum().backward()
    assert fq.alpha.grad.item() == 3.0  # x >= alpha
    assert x.grad[0] == 0 and x.grad[1] == 1 and x.grad[-1] == 0
    y = fq.eval()(x.detach())
    assert y.max().item() == pytest.approx(1.0) and y.min().item() == 0.0


def test_dorefa_and_bnn_gradients_flow():
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(1)).mul_(0.3).requires_grad_()
    for fq in (DoReFaWeightFakeQuant(3), BNNWeightFakeQuant(axis=0)):
        w.grad = None
        y = fq.train()(w)
        (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
        assert w.grad is not None and (w.grad != 0).float().mean() > 0.9
    y = DoReFaWeightFakeQuant(3)(w)
    assert y.abs().max().item() == pytest.approx(1.0)
    assert len(torch.unique(y)) <= 7


def test_quant_delay_and_eval():
    fq = EMAFakeQuant(4, signed=True, quant_delay=3)
    x = torch.linspace(-1, 1, 17)
    fq.train()
    for _ in range(3):
        assert torch.equal(fq(x), x)  # observing only
    assert fq.min_val.item() == -1.0 and fq.max_val.item() == 1.0
    y = fq(x)
    assert not torch.equal(y, x) and len(torch.unique(y)) <= 16
    assert int(fq.step) == 4
    fresh = LSQFakeQuant(4, quant_delay=10)
    assert not torch.equal(fresh.eval()(x), x)  # eval always quantizes (what ORT computes)


def test_ema_update():
    fq = EMAFakeQuant(8, decay=0.5).train()
    fq(torch.tensor([-1.0, 1.0]))
    fq(torch.tensor([-3.0, 5.0]))
    assert fq.min_val.item() == -2.0 and fq.max_val.item() == 3.0


def test_errors_and_state_roundtrip():
    with pytest.raises(QtoolError, match="no observed range"):
        MinMaxFakeQuant(8).qparams()
    with pytest.raises(QtoolError):
        BNNWeightFakeQuant().qparams()
    with pytest.raises(ValueError):
        MinMaxFakeQuant(9)
    with pytest.raises(ValueError):
        MinMaxFakeQuant(8, signed=False, symmetric=True)
    a = MinMaxFakeQuant(8, axis=0).train()
    a(torch.randn(3, 4))
    b = MinMaxFakeQuant(8, axis=0)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.qparams().scale, b.qparams().scale)


@pytest.mark.parametrize("make", [lambda: LSQFakeQuant(8, signed=False),
                                  lambda: LSQFakeQuant(4, axis=0, num_channels=3, narrow_range=True),
                                  lambda: EMAFakeQuant(8, signed=False)], ids=["lsq", "lsq-per-channel", "ema"])
def test_training_forward_traces_without_graph_breaks(make):
    # torch.compile of a QAT model is only worth trying when its quantizers trace as one graph
    import torch._dynamo

    fq = make().train()
    x = torch.randn(3, 5)
    fq(x)  # initialized (LSQ) / observed (EMA): the steady state of training
    torch._dynamo.reset()
    ex = torch._dynamo.explain(fq)(x)
    assert ex.graph_break_count == 0, ex.break_reasons
    ready = make().train()  # a fresh LSQ quantizer initializes on its first batch: a Python flag, no break
    assert torch._dynamo.explain(ready)(x).graph_break_count == 0


def test_shared_and_bias_quantizers_trace_without_graph_breaks():
    # as in a lifted QAT module: the root quantizers are submodules, the shared / bias ones read them
    import torch._dynamo

    from qtool.qat_quantizers import BiasFakeQuant, SharedFakeQuant

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.act, self.w = LSQFakeQuant(8, signed=False), LSQFakeQuant(8, axis=0, num_channels=4)
            self.shared, self.bias = SharedFakeQuant(self.act), BiasFakeQuant(self.act, self.w)

        def forward(self, x, wt, b):
            return self.shared(self.act(x)), self.w(wt), self.bias(b)

    net = Net().train()
    args = torch.rand(3, 5), torch.randn(4, 5), torch.randn(4)
    net(*args)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(net)(*args)
    assert ex.graph_break_count == 0, ex.break_reasons
