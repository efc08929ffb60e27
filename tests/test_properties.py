"""Property tests of the quantization arithmetic (hypothesis, bounded so the file runs in seconds).

- round trip: |dequant(quant(x)) - x| <= scale / 2 for x inside the representable range;
- saturation: x outside the range comes back as the range's end;
- per-channel: each channel is quantized with its own scale, independently of the others;
- zero-range tensors (all-zero weights, constant activations) never divide by zero: scale > 0, finite.

For qtool.ptq.weight_quant / activation_quant (the PTQ plan) and qtool.fakequant.fake_quant
(QAT; the same numbers ORT computes).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qtool.calibrate import METHODS, TensorStats
from qtool.fakequant import MinMaxFakeQuant, fake_quant, int_range
from qtool.ptq import QuantConfig, activation_quant, weight_quant

SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
F32_MILLI = float(np.float32(1e-3))  # hypothesis wants width-32 bounds exactly representable
EPS = 1e-6  # relative slack for float32 arithmetic in the bounds

bits_st = st.integers(2, 8)
mag_st = st.floats(1e-3, 1e3)


def finite_f32(lo=-1.0, hi=1.0):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=32)


def arrays(shape, lo=-1.0, hi=1.0):
    return hnp.arrays(np.float32, shape, elements=finite_f32(lo, hi))


def ref_fq(x, scale, zp, qmin, qmax):
    """NumPy reference: clamp(round_half_even(x / s) + zp) - zp, times s (float32, like ORT)."""
    x, scale = np.float32(x) if np.ndim(x) == 0 else x.astype(np.float32), np.float32(scale)
    q = np.clip(np.rint(x / scale) + zp, qmin, qmax)
    return ((q - zp) * scale).astype(np.float32)


# -------------------------------------------------------------------------------- weight_quant

@SETTINGS
@given(w=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=4, max_side=5), elements=finite_f32()),
       bits=bits_st, mag=mag_st)
def test_weight_per_tensor_round_trip_within_half_step(w, bits, mag):
    w = (w * np.float32(mag)).astype(np.float32)
    t = weight_quant(w, bits, None)
    s = t.scale
    assert isinstance(s, float) and math.isfinite(s) and s > 0
    assert t.zero_point == 0 and t.narrow and t.signed
    qmin, qmax = t.qrange
    assert (qmin, qmax) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    q = np.clip(np.rint(w.astype(np.float64) / s), qmin, qmax)
    assert np.all(np.abs(q * s - w) <= s / 2 * (1 + EPS) + EPS * np.abs(w))
    if np.any(w != 0):  # the scale is tight: max |w| maps to qmax
        assert abs(np.max(np.abs(w)) / s - qmax) <= 1e-4 * qmax


@SETTINGS
@given(data=st.data(), bits=bits_st)
def test_weight_per_channel_uses_each_channels_own_scale(data, bits):
    shape = data.draw(hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=4))
    axis = data.draw(st.integers(0, len(shape) - 1))
    w = data.draw(arrays(shape))
    gains = data.draw(hnp.arrays(np.float32, (shape[axis],), elements=st.sampled_from([0.0, 1e-3, 1.0, 50.0])))
    w = (w * np.expand_dims(gains, [d for d in range(len(shape)) if d != axis])).astype(np.float32)
    t = weight_quant(w, bits, axis)
    qmax = 2 ** (bits - 1) - 1
    assert t.granularity == "per_channel" and t.axis == axis
    assert len(t.scale) == len(t.zero_point) == shape[axis] and set(t.zero_point) == {0}
    for c in range(shape[axis]):
        wc = np.take(w, c, axis=axis)
        s = t.scale[c]
        assert math.isfinite(s) and s > 0
        amax = float(np.max(np.abs(wc)))
        if amax > 0:
            assert s == pytest.approx(amax / qmax, rel=1e-6)  # its own range, not the tensor's
        else:
            assert s == 1.0  # an all-zero channel: any positive scale is exact; never 0
        q = np.clip(np.rint(wc.astype(np.float64) / s), -qmax, qmax)
        assert np.all(np.abs(q * s - wc) <= s / 2 * (1 + EPS) + EPS * np.abs(wc))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_all_zero_weights_never_divide_by_zero(bits, axis):
    w = np.zeros((3, 2, 3, 3), np.float32)
    with np.errstate(all="raise"):  # any 0/0 or x/0 inside weight_quant raises here
        t = weight_quant(w, bits, axis)
    scales = t.scale if isinstance(t.scale, tuple) else (t.scale,)
    assert all(math.isfinite(s) and s > 0 for s in scales)
    assert len(scales) == (1 if axis is None else w.shape[axis])
    assert np.all(np.rint(w / np.float32(scales[0])) == 0)


# ---------------------------------------------------------------------------- activation_quant

@st.composite
def act_ranges(draw):
    a = draw(st.floats(-1e3, 1e3, allow_nan=False, width=32))
    b = draw(st.floats(-1e3, 1e3, allow_nan=False, width=32))
    return min(a, b), max(a, b)


@SETTINGS
@given(rng=act_ranges(), bits=bits_st, signed=st.booleans(), u=st.lists(st.floats(0, 1), min_size=1, max_size=20),
       over=st.floats(1.01, 100))
def test_activation_round_trip_and_saturation(rng, bits, signed, u, over):
    rmin, rmax = rng
    cfg = QuantConfig(act_bits=bits, act_signed=signed, act_symmetric=signed)
    with np.errstate(divide="raise", invalid="raise"):
        t = activation_quant(rmin, rmax, cfg)
    s, zp = t.scale, t.zero_point
    qmin, qmax = t.qrange
    assert math.isfinite(s) and s > 0 and qmin <= zp <= qmax
    lo, hi = min(rmin, 0.0), max(rmax, 0.0)
    assert ref_fq(np.float32(0.0), s, zp, qmin, qmax) == 0.0  # zero is exact (padding, Relu)
    # Inside the calibrated range: at most half a step off.
    x = np.asarray([lo + f * (hi - lo) for f in u], np.float32)
    err = np.abs(ref_fq(x, s, zp, qmin, qmax).astype(np.float64) - x)
    assert np.all(err <= s / 2 * (1 + 1e-4) + 1e-6 * np.abs(x)), (err.max(), s)
    # Outside the representable grid: saturates to its ends.
    top, bottom = np.float32((qmax - zp) * s), np.float32((qmin - zp) * s)
    big = np.float32(max(abs(top), abs(bottom), s) * over + s)
    assert ref_fq(big, s, zp, qmin, qmax) == top
    assert ref_fq(-big, s, zp, qmin, qmax) == bottom


@SETTINGS
@given(c=st.floats(-1e4, 1e4, allow_nan=False, width=32), n=st.integers(1, 300), bits=bits_st,
       method=st.sampled_from(METHODS), signed=st.booleans())
def test_constant_activation_never_divides_by_zero(c, n, bits, method, signed):
    """A constant tensor (0 included) calibrated with every method gives a positive, finite scale."""
    stats = TensorStats(bins=64)
    with np.errstate(divide="raise", invalid="raise"):
        stats.update(np.full(n, c, np.float32))
        stats.update(np.full(3, c, np.float32))
        rmin, rmax = stats.range(method, signed=signed, bits=bits)
        t = activation_quant(rmin, rmax, QuantConfig(act_bits=bits, act_signed=signed, act_symmetric=signed))
    assert math.isfinite(rmin) and math.isfinite(rmax) and rmin <= rmax
    assert math.isfinite(t.scale) and t.scale > 0
    y = ref_fq(np.float32(c), t.scale, t.zero_point, *t.qrange)
    assert np.isfinite(y)
    if method == "minmax":  # the constant itself is inside the range: represented within half a step
        assert abs(float(y) - c) <= t.scale / 2 * (1 + 1e-4) + 1e-6 * abs(c)


def test_zero_range_activation_scale_is_the_unit_fallback():
    for signed in (False, True):
        t = activation_quant(0.0, 0.0, QuantConfig(act_signed=signed, act_symmetric=signed))
        assert t.scale == 1.0 and t.zero_point == (0 if signed else 0)


# ---------------------------------------------------------------------------------- fake_quant

@SETTINGS
@given(x=arrays(hnp.array_shapes(min_dims=1, max_dims=3, max_side=6), -4.0, 4.0),
       scale=st.floats(F32_MILLI, 1.0, width=32), bits=bits_st, signed=st.booleans(), zp_frac=st.floats(0, 1))
def test_fake_quant_matches_reference_round_trip_and_saturates(x, scale, bits, signed, zp_frac):
    qmin, qmax = int_range(bits, signed)
    zp = int(round(qmin + zp_frac * (qmax - qmin)))
    y = fake_quant(torch.from_numpy(x), torch.tensor(scale, dtype=torch.float32), torch.tensor(float(zp)),
                   qmin, qmax).numpy()
    np.testing.assert_array_equal(y, ref_fq(x, scale, zp, qmin, qmax))  # bit-exact vs the reference
    s = np.float32(scale)
    lo, hi = np.float32((qmin - zp) * s), np.float32((qmax - zp) * s)
    inside = (x >= lo) & (x <= hi)
    assert np.all(np.abs(y[inside].astype(np.float64) - x[inside]) <= s / 2 * (1 + 1e-5))
    assert np.all(y[x > hi + s] == hi) and np.all(y[x < lo - s] == lo)
    assert np.all((y >= lo) & (y <= hi))


@SETTINGS
@given(data=st.data(), bits=bits_st, signed=st.booleans())
def test_fake_quant_per_channel_each_channel_its_own_scale(data, bits, signed):
    shape = data.draw(hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=4))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    C = shape[axis]
    x = data.draw(arrays(shape, -3.0, 3.0))
    scales = data.draw(hnp.arrays(np.float32, (C,), elements=st.floats(F32_MILLI, 1.0, width=32)))
    qmin, qmax = int_range(bits, signed)
    zps = data.draw(hnp.arrays(np.int64, (C,), elements=st.integers(qmin, qmax)))
    y = fake_quant(torch.from_numpy(x), torch.from_numpy(scales), torch.from_numpy(zps.astype(np.float32)),
                   qmin, qmax, axis=axis).numpy()
    for c in range(C):
        xc = np.take(x, c, axis=axis)
        expect = ref_fq(xc, scales[c], zps[c], qmin, qmax)
        np.testing.assert_array_equal(np.take(y, c, axis=axis), expect)
    # Changing one channel's scale leaves every other channel's output unchanged.
    if C > 1:
        s2 = scales.copy()
        s2[0] *= np.float32(3.0)
        y2 = fake_quant(torch.from_numpy(x), torch.from_numpy(s2), torch.from_numpy(zps.astype(np.float32)),
                        qmin, qmax, axis=axis).numpy()
        np.testing.assert_array_equal(np.take(y2, np.arange(1, C), axis=axis), np.take(y, np.arange(1, C), axis=axis))


@SETTINGS
@given(c=st.floats(-100, 100, allow_nan=False, width=32), bits=bits_st, signed=st.booleans(),
       symmetric=st.booleans(), per_channel=st.booleans())
def test_minmax_fake_quant_constant_input_never_divides_by_zero(c, bits, signed, symmetric, per_channel):
    assume(signed or not symmetric)
    fq = MinMaxFakeQuant(bits=bits, signed=signed, symmetric=symmetric, axis=1 if per_channel else None)
    x = torch.full((2, 3, 4), c)
    if per_channel:
        x[:, 1] = 0.0  # one all-zero channel next to constant ones
    fq.observe(x)
    scale, zp = fq.qparams().scale, fq.qparams().zero_point
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    assert np.all((zp.astype(np.int64) >= fq.qmin) & (zp.astype(np.int64) <= fq.qmax))
    y = fq.eval()(x)
    assert torch.isfinite(y).all()
    # The observed constant lies inside the observed range: its error is at most half a step.
    s = torch.as_tensor(scale).reshape((1, -1, 1) if per_channel else ())
    assert torch.all((y - x).abs() <= s / 2 * (1 + 1e-5) + 1e-6)
