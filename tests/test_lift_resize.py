"""Resize in every mode the lift runs, against onnxruntime (ops of segmentation / detection graphs)."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from qtool.errors import QtoolError
from qtool.lift import lift

CTMS = ["half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
        "tf_half_pixel_for_nn", "tf_crop_and_resize"]
ROI = [0, 0, 0.1, 0.25, 1, 1, 0.8, 0.9]  # used by tf_crop_and_resize only


def _resize_model(attrs: dict, *, scales=None, sizes=None, roi=None, opset=19, in_shape=(1, 2, 5, 7)):
    inits = []
    names = ["x", "", "", ""]
    if roi is not None:
        inits.append(numpy_helper.from_array(np.array(roi, np.float32), "roi"))
        names[1] = "roi"
    if scales is not None:
        inits.append(numpy_helper.from_array(np.array(scales, np.float32), "scales"))
        names[2] = "scales"
    if sizes is not None:
        inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
        names[3] = "sizes"
    while not names[-1]:
        names.pop()
    node = helper.make_node("Resize", names, ["y"], name="resize_0", **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, in_shape)],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _check(model, in_shape=(1, 2, 5, 7)):
    x = np.random.default_rng(0).standard_normal(in_shape).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        y = lift(model).eval()(torch.from_numpy(x)).numpy()
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)


def _cases():
    out = []
    for ctm, nm in itertools.product(CTMS, ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]):
        out.append(("nearest", ctm, {"nearest_mode": nm}))
    for ctm in CTMS:
        out.append(("linear", ctm, {}))
        out.append(("cubic", ctm, {}))
        out.append(("cubic", ctm, {"cubic_coeff_a": -0.5, "exclude_outside": 1}))
    return out


@pytest.mark.parametrize("mode,ctm,extra", _cases(), ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={w}" for k, w in v.items()) or "default")
@pytest.mark.parametrize("how", ["up", "down", "sizes"])
def test_resize_modes_match_ort(mode, ctm, extra, how):
    attrs = {"mode": mode, "coordinate_transformation_mode": ctm, **extra}
    if ctm == "tf_crop_and_resize":
        attrs["extrapolation_value"] = -3.0
    roi = ROI if ctm == "tf_crop_and_resize" else None
    if how == "sizes":
        _check(_resize_model(attrs, sizes=[1, 2, 8, 3], roi=roi))
    else:
        _check(_resize_model(attrs, scales=[1, 1, 2.0, 1.7] if how == "up" else [1, 1, 0.6, 0.5], roi=roi))


@pytest.mark.parametrize("policy", ["not_larger", "not_smaller"])
def test_resize_axes_and_keep_aspect_ratio(policy):
    attrs = {"mode": "linear", "axes": [2, 3], "keep_aspect_ratio_policy": policy}
    _check(_resize_model(attrs, sizes=[9, 9]))
    _check(_resize_model({"mode": "nearest", "axes": [-1]}, scales=[2.5]))


def test_resize_to_one_pixel_and_identity_scale():
    for ctm in ("pytorch_half_pixel", "align_corners", "half_pixel"):
        _check(_resize_model({"mode": "linear", "coordinate_transformation_mode": ctm}, sizes=[1, 2, 1, 4]))
    _check(_resize_model({"mode": "nearest", "coordinate_transformation_mode": "tf_half_pixel_for_nn",
                          "nearest_mode": "round_prefer_ceil"}, scales=[1, 1, 1, 2]))


def test_resize_gradient_reaches_input():
    model = _resize_model({"mode": "cubic", "coordinate_transformation_mode": "asymmetric"}, scales=[1, 1, 1.5, 2])
    x = torch.randn(1, 2, 5, 7, requires_grad=True)
    lift(model)(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().min() > 0


def test_resize_antialias_is_refused():
    model = _resize_model({"mode": "linear", "antialias": 1}, scales=[1, 1, 0.5, 0.5])
    with pytest.raises(QtoolError, match="Resize in node 'resize_0': antialias"):
        lift(model)
