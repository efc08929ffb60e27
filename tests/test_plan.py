"""QuantPlan JSON: round trip, validation against a model, clear errors for bad plans."""
from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qtool.errors import QtoolError
from qtool.plan import QuantPlan, TensorQuant


def model():
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "W")
    g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], name="conv")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def plan():
    return QuantPlan({
        "x": TensorQuant("activation", 8, False, scale=0.02, zero_point=128),
        "W": TensorQuant("weight", 4, True, "per_channel", 0, (0.1, 0.2, 0.3, 0.4), (0, 0, 0, 0), narrow=True),
        "y": TensorQuant("activation", 6, False),  # to be calibrated
    }, meta={"producer": "test"})


def test_round_trip_and_save(tmp_path):
    p = plan()
    path = p.save(tmp_path / "plan.json")
    q = QuantPlan.load(path, model())
    assert q.tensors == p.tensors and q.meta == p.meta and q.version == 1
    assert not q.calibrated and q.tensors["W"].qrange == (-7, 7) and q.tensors["y"].qrange == (0, 63)
    assert TensorQuant("activation", 8, True).qrange == (-128, 127)
    assert [f.name for f in tmp_path.iterdir()] == ["plan.json"]  # atomic write leaves no temp file


def _mutated(**change):
    d = json.loads(plan().to_json())
    for path, value in change.items():
        keys = path.split("__")
        tgt = d
        for k in keys[:-1]:
            tgt = tgt[k]
        tgt[keys[-1]] = value
    return json.dumps(d)


@pytest.mark.parametrize("text,msg", [
    ("{not json", "not valid JSON"),
    ("[]", "must be a JSON object"),
    (_mutated(version=2), "unsupported plan version 2"),
    (_mutated(tensors__W__bits=9), "bits must be an integer in 2..8"),
    (_mutated(tensors__W__bits=1), "bits must be an integer in 2..8"),
    (_mutated(tensors__x__scale=-1.0), "scale must be a finite number > 0"),
    (_mutated(tensors__x__scale=0.0), "scale must be a finite number > 0"),
    (_mutated(tensors__x__zero_point=300), "zero_point must be an integer in [0, 255]"),
    (_mutated(tensors__x__zero_point=None), "both be set or both be null"),
    (_mutated(tensors__W__scale=[0.1, 0.2]), "2 scales but 4 zero points"),
    (_mutated(tensors__W__granularity="per_row"), "granularity must be one of"),
    (_mutated(tensors__W__axis=None), "per_channel needs a non-negative integer axis"),
    (_mutated(tensors__W__kind="bias"), "kind must be one of"),
    (_mutated(tensors__W__color="red"), "unknown fields"),
    (_mutated(tensors__nope={"kind": "activation", "bits": 8, "signed": False}), "'nope' is not in the model"),
    (_mutated(tensors__y__kind="weight"), "'y' is not an initializer"),
    (_mutated(tensors__W__axis=5), "axis 5 out of range"),
    (_mutated(tensors__W__scale=[0.1, 0.2, 0.3], tensors__W__zero_point=[0, 0, 0]), "3 scales for 4 channels"),
])
def test_bad_plans_raise_one_clear_error(text, msg):
    with pytest.raises(QtoolError) as ei:
        QuantPlan.from_json(text, model())
    assert msg in str(ei.value) and "\n" not in str(ei.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(QtoolError, match="plan file not found"):
        QuantPlan.load(tmp_path / "nope.json")
