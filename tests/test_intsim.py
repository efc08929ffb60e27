"""qtool.intsim executes exported integer graphs bit for bit like onnxruntime; requantization math."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters.common import Builder, fixed_point, fixed_point_common
from exporters.integer import IntegerBackend
from exporters.lower import QTensor
from qtool.errors import QtoolError
from qtool.exporting import ExportConfig, export_model
from qtool.intsim import IntSim, conv_integer, matmul_integer
from qtool.ortkernels import EXACT, PAIRS, PAIRS_CHW, PAIRS_HWC, accumulation
from qtool.ptq import QuantConfig
from test_exporters import make, ort_run


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(weight_bits=4, act_bits=4),
                                    QuantConfig(act_signed=True, act_symmetric=True)], ids=["w8a8", "w4a4", "s8s8"])
def test_intsim_equals_onnxruntime(config):
    fused, _, plan = make(config)
    model = export_model(fused, plan, ExportConfig(format="integer")).model
    sim = IntSim(model)
    r = np.random.default_rng(11)
    disagreements = 0
    for scale in (0.5, 1.0, 3.0):  # include saturating inputs
        x = (r.normal(size=(32, 3, 8, 8)) * scale).astype(np.float32)
        disagreements += int(np.sum(sim({"x": x})[0] != ort_run(model, x)))
    assert disagreements == 0


def test_fixed_point():
    m = np.array([1e-12, 3.7e-6, 0.0123, 0.5, 0.99999999999, 1.0, 7.5, 1000.0])
    m0, n = fixed_point(m)
    assert np.all((n >= 1) & (n <= 62))
    normal = n < 62
    assert np.all((m0[normal] >= 2**30) & (m0[normal] < 2**31))
    assert np.all(np.abs(m0 * 2.0 ** -n.astype(np.float64) - m)[normal] / m[normal] < 2.0**-30)
    ms, k = fixed_point_common([0.25, 0.01])
    assert 2**30 <= ms[0] < 2**31 and ms[1] == round(0.01 * 2**k)
    with pytest.raises(QtoolError):
        fixed_point(np.array([0.0]))
    with pytest.raises(QtoolError):
        fixed_point(np.array([2.0**31]))


def test_rounding_shift_signed_values_and_ties():
    """clip(z + round_half_up(p * m0 / 2^n)) through Mul/Add/Cast/BitShift, vs exact Python integers."""
    src = helper.make_graph([], "g", [], [])
    b = Builder(src)
    be = IntegerBackend()
    t = QTensor("", 0.1, 100, np.uint8, 0, 255)
    m = 0.375  # m0 = 3 * 2^29, n = 31: ties at p * m0 = (k + 1/2) 2^31
    y = be._requant(b, "p", np.asarray(m), 0, np.asarray(2**24), t, "r")
    g = helper.make_graph(b.nodes, "requant", [helper.make_tensor_value_info("p", TensorProto.INT32, ["N"])],
                          [helper.make_tensor_value_info(y, TensorProto.UINT8, ["N"])], list(b.inits.values()))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    p = np.concatenate([np.arange(-400, 400), [4, -4, 12, -12, 2**20, -(2**20)]]).astype(np.int32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"p": p})[0]
    m0, n = (int(v) for v in fixed_point(np.asarray(m)))
    want = [min(255, max(0, 100 + (int(v) * m0 + 2 ** (n - 1)) // 2**n)) for v in p]  # floor division: half up
    np.testing.assert_array_equal(got, np.array(want, np.uint8))
    np.testing.assert_array_equal(IntSim(model)({"p": p})[0], got)
    assert got[list(p).index(4)] == 102 and got[list(p).index(-4)] == 99  # 1.5 -> 2, -1.5 -> -1


def test_intsim_refuses_other_graphs():
    fused, qdq, plan = make()
    with pytest.raises(QtoolError, match="com.microsoft"):
        IntSim(export_model(fused, plan, ExportConfig(format="qoperator")).model)
    with pytest.raises(QtoolError, match="not part of qtool's integer format"):
        IntSim(qdq)({"x": np.zeros((1, 3, 8, 8), np.float32)})


# ------------------------------------------------------------------------------------------------
# ConvInteger / MatMulInteger against onnxruntime's kernels on this CPU (qtool.ortkernels)
# ------------------------------------------------------------------------------------------------
def _ort_node(node, inits: dict, x: np.ndarray) -> np.ndarray:
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(node.input[0], TensorProto.UINT8, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {node.input[0]: x})[0]


def _other(found: str, pairs: str) -> str:
    """The accumulation model that is not this CPU's: the test must tell them apart."""
    return pairs if found == EXACT else EXACT


@pytest.mark.parametrize("m,k", [(64, 64), (64, 63), (1, 64)], ids=["k64", "odd-k", "one-row"])
def test_matmul_integer_equals_onnxruntime(m, k):
    """Full-range uint8 x int8 codes: pairs overflow int16 often (without VNNI ORT saturates them)."""
    rng = np.random.default_rng(k + m)
    a, b, za = rng.integers(0, 256, (m, k)).astype(np.uint8), rng.integers(-128, 128, (k, 10)).astype(np.int8), 37
    ref = _ort_node(helper.make_node("MatMulInteger", ["a", "b", "za"], ["y"]), dict(b=b, za=np.uint8(za)), a)
    found = accumulation("MatMulInteger")
    np.testing.assert_array_equal(matmul_integer(a, b, np.uint8(za), accumulate=found), ref)
    assert not np.array_equal(matmul_integer(a, b, np.uint8(za), accumulate=_other(found, PAIRS)), ref)


CONV_INTEGER_CASES = {"3x3": (32, 16, dict(pads=[1, 1, 1, 1])), "cin 3": (3, 8, dict(pads=[1, 1, 1, 1])),
                      "stride 2, asymmetric pads": (8, 8, dict(pads=[0, 1, 2, 1], strides=[2, 2])),
                      "grouped": (8, 16, dict(pads=[1, 1, 1, 1], group=2))}


@pytest.mark.parametrize("case", list(CONV_INTEGER_CASES))
def test_conv_integer_equals_onnxruntime(case):
    cin, cout, attrs = CONV_INTEGER_CASES[case]
    rng = np.random.default_rng(len(case))
    x = rng.integers(0, 256, (2, cin, 8, 8)).astype(np.uint8)
    w, zx = rng.integers(-128, 128, (cout, cin // attrs.get("group", 1), 3, 3)).astype(np.int8), np.uint8(29)
    ref = _ort_node(helper.make_node("ConvInteger", ["x", "w", "zx"], ["y"], **attrs), dict(w=w, zx=zx), x)
    found = accumulation("ConvInteger")
    np.testing.assert_array_equal(conv_integer(x, w, zx, **attrs, accumulate=found), ref)
    # ConvInteger im2cols NCHW: were it to saturate, its pairs would be (c, kh, kw)-adjacent
    assert not np.array_equal(conv_integer(x, w, zx, **attrs, accumulate=_other(found, PAIRS_CHW)), ref)


@pytest.mark.parametrize("order", [PAIRS_HWC, PAIRS_CHW])
@pytest.mark.parametrize("case", list(CONV_INTEGER_CASES))
def test_conv_integer_pairs_equal_a_brute_force_sum(case, order):
    """On every CPU: the saturation of the pairs that can saturate, added to the exact sum, equals
    saturating every pair of every product (K ordered as `order`, per group)."""
    cin, cout, attrs = CONV_INTEGER_CASES[case]
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (2, cin, 6, 6)).astype(np.uint8)
    group, zx = attrs.get("group", 1), 29
    w = rng.integers(-128, 128, (cout, cin // group, 3, 3)).astype(np.int8)
    pads, (sh, sw) = attrs["pads"], attrs.get("strides", [1, 1])
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=zx)
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))[:, :, ::sh, ::sw]  # N, C, OH, OW, 3, 3
    cg, og = cin // group, cout // group
    want = []
    for g in range(group):
        cols, wg = win[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og].astype(np.int64)
        if order == PAIRS_HWC:
            cols, wg = cols.transpose(0, 2, 3, 4, 5, 1), wg.transpose(0, 2, 3, 1)
        else:
            cols = cols.transpose(0, 2, 3, 1, 4, 5)
        a, b = cols.reshape(*cols.shape[:3], -1), wg.reshape(og, -1)  # N, OH, OW, K and O, K
        prod = np.concatenate([a[..., None, :] * b, np.zeros(a.shape[:3] + (og, 1), np.int64)], -1)  # odd K: pad
        pairs = np.clip(prod[..., :2 * ((b.shape[1] + 1) // 2)].reshape(*prod.shape[:4], -1, 2).sum(-1), -32768, 32767)
        want.append(pairs.sum(-1) - zx * b.sum(1))
    want = np.concatenate(want, -1).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(conv_integer(x, w, np.uint8(zx), **attrs, accumulate=order), want)
    assert not np.array_equal(conv_integer(x, w, np.uint8(zx), **attrs), want)  # pairs did saturate
