"""qtool.intsim executes exported integer graphs bit for bit like onnxruntime; requantization math."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from exporters.common import Builder, fixed_point, fixed_point_common
from exporters.integer import IntegerBackend
from exporters.lower import QTensor
from qtool.errors import QtoolError
from qtool.exporting import ExportConfig, export_model
from qtool.intsim import IntSim
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
