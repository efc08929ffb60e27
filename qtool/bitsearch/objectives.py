"""Objectives of the bit-width search (all minimized) and what onnxruntime's CPU kernels reward.

- `acc`: top-1 error (1 - accuracy) on the validation split, from the evaluator (`qat` fine-tunes
  each candidate, `supernet` scores it with shared weights). Reported as accuracy.
- `flops`: QuantEA's bit-weighted FLOPs, sum over layers of MACs x (bw/32 + ba/32).
- `bitops`: sum over layers of MACs x bw x ba (HAWQ's BitOps).
- `size`: bytes of the QDQ model `exporters.qdq.apply_plan` writes for the candidate's plan
  (serialized exactly; the file on disk has the same bytes).
- `packed_size`: bytes of the weights packed at their bit-width (ceil(n x bw / 8) per weight):
  what an exporter with int4/int2 storage would approach (biases and scales not counted).
- `latency`: median milliseconds of onnxruntime (CPU EP, default optimizations, batch 1) on the
  exact QDQ graph of the candidate; measured once per configuration and cached in the log.

What the hardware actually rewards, measured on stock onnxruntime CPU (MLAS): only 8-bit vs float
is faster. Every Q/DQ type is an 8-bit container (int8/uint8), ORT's integer kernels
(QLinearConv, MatMulInteger, QGemm) run 8-bit arithmetic whatever the code range, so a 4- or
2-bit weight costs exactly what an 8-bit one costs, and `size` (QDQ file bytes) does not shrink
below 8 bits either. Sub-8-bit activations are even slightly slower: their narrow range is an
extra integer Clip on the codes (Q -> Clip -> DQ; the producer still runs as an integer kernel). So `latency` and
`size` are flat (or rise) below 8 bits, and `flops`/`bitops`/`packed_size` describe hardware
with real low-bit arithmetic/storage (accelerators, bit-serial or packed kernels), not ORT's CPU EP.
Search with `latency` when the deployment is ORT on CPU; with `bitops`/`flops` for such hardware.

So the default target `cpu` (`space.py`) offers each layer only what those kernels can run: float,
int8 and w4a8 (no 2-bit, no sub-8-bit activations), FLOAT counting 32 bits in `flops` / `bitops` /
`packed_size`. Its `latency` and `size` are measured on the exported graph, since which of float and
int8 is faster depends on the layer (the Q/DQ around an integer kernel costs too: on LeNet-5 / digits
uniform float ran in 0.10 ms, uniform int8 in 0.16 ms), and a quantized layer whose output only float
layers read runs as a float kernel (no output Q).
w4a8 buys nothing in `latency` or `size` (int8 containers); its gain shows in `packed_size` only:
packed INT4 initializers (`export --int4 on`) do shrink the file, but onnxruntime 1.32's CPU EP then
runs those layers as float kernels fed by DequantizeLinear (measured: 2 of 4 convs fell back, 35 %
slower), which is why `size` keeps the containers.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from qtool.errors import QtoolError
from qtool.plan import QuantPlan
from qtool.bitsearch.space import Candidate, SearchSpace, weight_array

OBJECTIVE_NAMES = ("acc", "flops", "bitops", "size", "packed_size", "latency")
CONSTRAINT_NAMES = ("size", "latency")


@dataclass
class Metrics:
    """Everything a candidate is judged on except accuracy: computed in the main process, cheap or
    cached (`size`/`latency` build the QDQ graph from a reference plan: their value does not depend
    on the scales, only on the bits)."""
    fused: onnx.ModelProto
    space: SearchSpace
    act_ranges: dict[str, tuple[float, float]]  # activation root -> calibrated (min, max), FP32
    latency_threads: int = 1
    latency_runs: int = 30
    _qdq: dict[str, bytes] = field(default_factory=dict, repr=False)

    def reference_plan(self, c: Candidate) -> QuantPlan:
        """A calibrated plan with the candidate's bits: weights per-channel min/max, activations from
        the FP32 ranges (what PTQ would give); used for size/latency and the uniform baselines' export."""
        from qtool.ptq import QuantConfig, activation_quant, weight_quant

        bits = self.space.quantized_bits(c)  # float tensors take no entry: the exported graph runs them float
        plan = QuantPlan(meta={"producer": "qtool.search (reference)", "candidate": c.key})
        for name, axis in self.space.weights.items():
            if name in bits:
                plan.tensors[name] = weight_quant(weight_array(self.fused, name), bits[name], axis)
        for root, members in self.space.groups.items():
            if root not in bits:
                continue
            rmin, rmax = self.act_ranges[root]
            tq = activation_quant(rmin, rmax, QuantConfig(act_bits=bits[root]))
            for t in members:
                plan.tensors[t] = tq
        return plan

    def qdq_bytes(self, c: Candidate) -> bytes:
        if c.key not in self._qdq:
            from exporters.qdq import apply_plan

            if len(self._qdq) > 64:  # a bounded cache: the log keeps the numbers
                self._qdq.clear()
            self._qdq[c.key] = apply_plan(self.fused, self.reference_plan(c)).SerializeToString()
        return self._qdq[c.key]


class Objective:
    name = ""
    label = ""
    needs_accuracy = False

    def compute(self, c: Candidate, m: Metrics, acc: float | None) -> float:
        raise NotImplementedError

    def display(self, v: float) -> float:
        """The value as people read it (accuracy rather than error)."""
        return v


class Accuracy(Objective):
    name, label, needs_accuracy = "acc", "top-1", True

    def compute(self, c, m, acc):
        if acc is None:
            raise ValueError("accuracy objective needs the evaluator's accuracy")
        return 1.0 - float(acc)

    def display(self, v):
        return 1.0 - v


class Flops(Objective):
    name, label = "flops", "FLOPs (QuantEA)"

    def compute(self, c, m, acc):
        return float(sum(l.macs * (w / 32 + a / 32) for l, (w, a) in zip(m.space.layers, m.space.effective(c))))


class BitOps(Objective):
    name, label = "bitops", "BitOps"

    def compute(self, c, m, acc):
        return float(sum(l.macs * w * a for l, (w, a) in zip(m.space.layers, m.space.effective(c))))


class Size(Objective):
    name, label = "size", "QDQ bytes"

    def compute(self, c, m, acc):
        return float(len(m.qdq_bytes(c)))


class PackedSize(Objective):
    name, label = "packed_size", "packed weight bytes"

    def compute(self, c, m, acc):
        bits = m.space.tensor_bits(c)
        return float(sum(math.ceil(weight_array(m.fused, w).size * bits[w] / 8) for w in m.space.weights))


class Latency(Objective):
    name, label = "latency", "ORT ms (batch 1)"

    def compute(self, c, m, acc):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = m.latency_threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(m.qdq_bytes(c), so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [1 if not isinstance(d, int) or d <= 0 else d for d in inp.shape]
        x = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        for _ in range(5):
            sess.run(None, x)
        times = []
        for _ in range(m.latency_runs):
            t0 = time.perf_counter()
            sess.run(None, x)
            times.append((time.perf_counter() - t0) * 1e3)
        return float(statistics.median(times))


_BY_NAME = {cls.name: cls for cls in (Accuracy, Flops, BitOps, Size, PackedSize, Latency)}


def make_objectives(names) -> list[Objective]:
    """'acc,flops' or ['acc', 'flops'] -> objective instances (order kept, at least two, acc first
    if present)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    bad = [n for n in names if n not in _BY_NAME]
    if bad:
        raise QtoolError(f"unknown objective {bad[0]!r}; choose from {', '.join(OBJECTIVE_NAMES)}")
    if len(set(names)) != len(names):
        raise QtoolError(f"objectives repeat a name: {','.join(names)}")
    if len(names) < 2:
        raise QtoolError(f"--objectives needs at least two objectives, got {','.join(names) or '(none)'}")
    return [_BY_NAME[n]() for n in names]


def metric(name: str) -> Objective:
    return _BY_NAME[name]()
