"""Deployment of a trained DynamicNet on stock onnxruntime: controller.onnx + one QDQ model per
configuration of a capped codebook, routed per sample by `DynamicSession`.

- `controller.onnx`: the stem exactly as the QDQ models compute it (extracted from one of them: the
  stem is static, so every configuration shares it), then GAP -> FC -> ReLU -> FC in float, the
  codebook scores (a MatMul with the 0/1 matrix of the codebook) and ArgMax: output `config`
  (int64, one index per sample). The stem therefore runs twice per sample (controller and the
  routed model); its share of the cost is in the latency numbers.
- `configs/<i>.onnx`: `apply_plan` of `DynamicNet.export_config(codebook[i])`.
- `manifest.json`: bits per layer of each configuration, their BitFLOPs, file names.

`DynamicSession.run(x)`: controller -> group the batch by configuration (stable order) -> run each
group's model -> scatter the outputs back to the input order.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qtool.errors import QtoolError
from qtool.io import atomic_write_text, load_model, save_model

MANIFEST = "manifest.json"


def ort_session(model: onnx.ModelProto | bytes, threads: int | None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    blob = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise QtoolError(f"onnxruntime cannot load the model: {str(e).strip().splitlines()[0]}") from None


def controller_model(net, qdq: onnx.ModelProto) -> onnx.ModelProto:
    """controller.onnx from a trained DynamicNet (codebook set) and any of its configuration QDQ models."""
    inp = [i.name for i in qdq.graph.input if i.name not in {t.name for t in qdq.graph.initializer}]
    sub = onnx.utils.Extractor(qdq).extract_model(inp, [net.tap])
    g = sub.graph
    c = net.controller
    m = net.codebook_matrix().numpy().astype(np.float32)
    fc2_w, fc2_b = c.fc2_per_layer()
    for name, arr in (("ctl.fc1.w", c.fc1.weight), ("ctl.fc1.b", c.fc1.bias), ("ctl.fc2.w", fc2_w),
                      ("ctl.fc2.b", fc2_b)):
        g.initializer.append(numpy_helper.from_array(arr.detach().cpu().numpy().astype(np.float32), name))
    g.initializer.append(numpy_helper.from_array(m, "ctl.codebook"))
    pool = "GlobalAveragePool" if len(net.space_shape(net.tap)) > 2 else "Identity"
    feat = net.tap
    if c.conv is not None:
        for name, arr in (("ctl.conv.w", c.conv.weight), ("ctl.conv.b", c.conv.bias)):
            g.initializer.append(numpy_helper.from_array(arr.detach().cpu().numpy().astype(np.float32), name))
        g.node.extend([helper.make_node("Conv", [net.tap, "ctl.conv.w", "ctl.conv.b"], ["ctl.conv"], name="ctl_conv",
                                        kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                       helper.make_node("Relu", ["ctl.conv"], ["ctl.convr"], name="ctl_conv_relu")])
        feat = "ctl.convr"
    g.node.extend([
        helper.make_node(pool, [feat], ["ctl.pool"], name="ctl_pool"),
        helper.make_node("Flatten", ["ctl.pool"], ["ctl.feat"], name="ctl_flatten", axis=1),
        helper.make_node("Gemm", ["ctl.feat", "ctl.fc1.w", "ctl.fc1.b"], ["ctl.h"], name="ctl_fc1", transB=1),
        helper.make_node("Relu", ["ctl.h"], ["ctl.hr"], name="ctl_relu"),
        helper.make_node("Gemm", ["ctl.hr", "ctl.fc2.w", "ctl.fc2.b"], ["ctl.logits"], name="ctl_fc2", transB=1),
        helper.make_node("MatMul", ["ctl.logits", "ctl.codebook"], ["ctl.scores"], name="ctl_scores"),
        helper.make_node("ArgMax", ["ctl.scores"], ["config"], name="ctl_argmax", axis=1, keepdims=0),
    ])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("config", TensorProto.INT64, ["N"]))
    g.name = "qtool_dynamic_controller"
    del sub.metadata_props[:]
    for p in qdq.metadata_props:
        sub.metadata_props.add(key=p.key, value=p.value)
    onnx.checker.check_model(sub, full_check=True)
    return sub


def write_deployment(net, codebook: np.ndarray, out_dir: Path) -> dict:
    """controller.onnx + configs/<i>.onnx + manifest.json in `out_dir`; returns the manifest."""
    from exporters.qdq import apply_plan

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "configs").mkdir(exist_ok=True)
    net.set_mode("codebook", codebook=codebook)
    entries, first = [], None
    for i, cfg in enumerate(codebook):
        fused, plan = net.export_config(cfg)
        qdq = apply_plan(fused, plan)
        first = first or qdq
        save_model(qdq, out_dir / "configs" / f"{i}.onnx")
        entries.append({"index": i, "file": f"configs/{i}.onnx", "choice": [int(v) for v in cfg],
                        "bits": net.config_bits(cfg), "bitflops": net.config_bitflops(cfg)})
    save_model(controller_model(net, first), out_dir / "controller.onnx")
    manifest = {"version": 1, "controller": "controller.onnx", "choices": list(net.choices),
                "layers": [{"node": l.node, "op": l.op, "macs": l.macs, "dynamic": l.dynamic is not None}
                           for l in net.layers], "configs": entries}
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


class DynamicSession:
    """Routes each sample to the QDQ model of the configuration the controller picks.

    `DynamicSession(controller, models)` takes ONNX models (protos or bytes); `DynamicSession.load(dir)`
    reads a deployment written by `write_deployment`. `run(x)` returns the outputs in input order;
    `last_configs` holds the configuration index of each sample of the last call.
    """

    def __init__(self, controller, models: list, bitflops: list[float] | None = None, threads: int | None = None):
        if not models:
            raise QtoolError("a dynamic deployment needs at least one configuration model")
        self.controller = ort_session(controller, threads)
        self.sessions = [ort_session(m, threads) for m in models]
        self.bitflops = np.asarray(bitflops, np.float64) if bitflops is not None else None
        self.input_name = self.controller.get_inputs()[0].name
        self.last_configs: np.ndarray | None = None
        for s in self.sessions:
            dim = s.get_inputs()[0].shape[0]
            if isinstance(dim, int) and dim > 0:
                raise QtoolError(f"configuration models need a dynamic batch dimension, got {dim}")

    @classmethod
    def load(cls, directory: str | Path, threads: int | None = None) -> "DynamicSession":
        d = Path(directory)
        p = d / MANIFEST
        if not p.is_file():
            raise QtoolError(f"no {MANIFEST} in {d}: not a qtool dynamic deployment")
        try:
            man = json.loads(p.read_text())
            files = [d / e["file"] for e in man["configs"]]
            bf = [float(e["bitflops"]) for e in man["configs"]]
            ctl = d / man["controller"]
        except (ValueError, KeyError, TypeError) as e:
            raise QtoolError(f"{p} is malformed: {e}") from None
        return cls(load_model(ctl), [load_model(f) for f in files], bf, threads)

    def route(self, x: np.ndarray) -> np.ndarray:
        cfg = self.controller.run(None, {self.input_name: x})[0].astype(np.int64)
        if len(cfg) and (cfg.min() < 0 or cfg.max() >= len(self.sessions)):
            raise QtoolError(f"controller chose configuration {int(cfg.max())}; only {len(self.sessions)} exist")
        return cfg

    def run_routed(self, x: np.ndarray, cfg: np.ndarray) -> np.ndarray:
        """Run each sample through the model of its configuration `cfg[i]`; outputs in input order."""
        out = None
        for c in np.unique(cfg):
            idx = np.flatnonzero(cfg == c)  # ascending: the group keeps the input order
            sess = self.sessions[int(c)]
            y = sess.run(None, {sess.get_inputs()[0].name: x[idx]})[0]
            if out is None:
                out = np.empty((len(x),) + y.shape[1:], y.dtype)
            out[idx] = y
        return out if out is not None else np.empty((0,), np.float32)

    def run(self, x: np.ndarray) -> np.ndarray:
        cfg = self.route(x)
        self.last_configs = cfg
        return self.run_routed(x, cfg)


def latency(dyn: DynamicSession, static: onnx.ModelProto, x: np.ndarray, batches=(1, 64), runs: int = 50,
            warmup: int = 5, threads: int = 1) -> dict:
    """Median ms of the routed dynamic model, its controller alone, and one static QDQ model, measured
    interleaved (one run of each per round) on the same inputs; batch b uses x[:b] (x must be large enough)."""
    st = ort_session(static, threads)
    name = st.get_inputs()[0].name
    out = {"threads": threads, "runs": runs}
    for b in batches:
        xb = np.ascontiguousarray(x[:b])
        if len(xb) < b:
            continue
        fns = {"static": lambda: st.run(None, {name: xb}),
               "controller": lambda: dyn.route(xb),
               "dynamic": lambda: dyn.run(xb)}
        times = {k: [] for k in fns}
        for r in range(warmup + runs):
            for k, f in (fns.items() if r % 2 == 0 else reversed(fns.items())):
                t0 = time.perf_counter()
                f()
                if r >= warmup:
                    times[k].append((time.perf_counter() - t0) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        dyn.run(xb)
        out[f"batch{b}"] = {**{f"{k}_ms": v for k, v in med.items()},
                            "dynamic_over_static": med["dynamic"] / med["static"],
                            "routing_overhead_ms": med["dynamic"] - med["static"],
                            "groups": int(len(np.unique(dyn.last_configs)))}
    return out
