"""Bring the committed W4A4 QAT models (benchmarks/models/*.qat_*.onnx) to the current QDQ layout.

They were exported when a sub-8-bit activation was `Clip(float range) -> Q -> DQ`; passes.qdq now
writes `Q -> Clip(codes) -> DQ`, which onnxruntime fuses into integer kernels. Both describe the same
codes: every float Clip bound must be exactly a code (checked), and the rewritten model must run every
Conv/Gemm as an integer kernel. The logits are not bit-equal to the old file's, because ORT ran the
old file's convolutions in float (the fallback this fixes), whose sums round ties differently from
the exact integer kernels; top-1 and argmax agreement on the whole val split are reported.

    python -m benchmarks.relayout_qat_models   # rewrites in place, writes results/relayout_qat_models.json
"""
from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import numpy_helper

from benchmarks.common import MODELS, cifar_spec, write_result
from qtool.data import load_dataset
from qtool.io import load_model, save_model
from qtool.ortgraph import integer_kernel_report


def relayout(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Clip(x, lo, hi) -> Q(s, z) becomes Q(s, z) -> Clip(codes, Q(lo), Q(hi)): the same codes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    all_nodes = []  # standalone copies: stable identities while the graph is rebuilt
    for n in g.node:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        all_nodes.append(c)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in all_nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    pairs = {}
    for n in all_nodes:
        r = readers.get(n.output[0], []) if n.op_type == "Clip" else []
        if len(r) == 1 and r[0].op_type == "QuantizeLinear" \
                and all(i in inits for i in list(n.input[1:]) + list(r[0].input[1:])):
            pairs[id(n)] = r[0]
    moved_q = {id(q) for q in pairs.values()}
    nodes = []
    for n in all_nodes:
        if id(n) in moved_q:
            continue  # emitted before its Clip
        q = pairs.get(id(n))
        if q is not None:
            s, z = (numpy_helper.to_array(inits[i]) for i in q.input[1:3])
            lo, hi = (numpy_helper.to_array(inits[i]).astype(np.float64) / s + z for i in n.input[1:3])
            if max(abs(lo - np.rint(lo)), abs(hi - np.rint(hi))) > 1e-3:
                raise ValueError(f"Clip {n.name}: bounds are not codes of the Q that follows")
            lo, hi = np.rint(lo), np.rint(hi)
            names = (f"{q.name}_code_min", f"{q.name}_code_max")
            g.initializer.extend(numpy_helper.from_array(np.array(v, z.dtype), k) for k, v in zip(names, (lo, hi)))
            codes = q.output[0]
            q.input[0], q.output[0] = n.input[0], codes + "_container"
            n.input[:] = [q.output[0], *names]
            n.output[0] = codes
            nodes.append(q)
        nodes.append(n)
    g.ClearField("node")
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used or t.name in {i.name for i in g.input}]
    g.ClearField("initializer")
    g.initializer.extend(kept)
    return m, len(pairs)


def main() -> int:
    spec = cifar_spec()
    if spec is None:
        print("shared CIFAR-10 data absent: nothing to check against", file=sys.stderr)
        return 1
    val = load_dataset(spec, "val")
    x = val.preprocess.apply(val.images)
    import onnxruntime as ort

    rows = {}
    for path in sorted(MODELS.glob("*.qat_*.onnx")):
        old = load_model(path)
        new, moved = relayout(old)
        if not moved:
            rows[path.name] = {"moved_clips": 0}
            continue
        onnx.checker.check_model(new, full_check=True)
        outs = []
        for m in (old, new):
            sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            name = sess.get_inputs()[0].name
            outs.append(np.concatenate([sess.run(None, {name: x[i:i + 500]})[0] for i in range(0, len(x), 500)]))
        r_old, r_new = integer_kernel_report(old), integer_kernel_report(new)
        rows[path.name] = {"moved_clips": moved, "clip_bounds_are_codes": True, "val_images": len(x),
                           "top1_before": float((outs[0].argmax(1) == val.labels).mean()),
                           "top1_after": float((outs[1].argmax(1) == val.labels).mean()),
                           "argmax_agreement": float((outs[0].argmax(1) == outs[1].argmax(1)).mean()),
                           "float_fallbacks_before": r_old.float_fallbacks, "float_fallbacks_after": r_new.float_fallbacks,
                           "integer_compute_after": r_new.integer_compute}
        print(path.name, rows[path.name], file=sys.stderr)
        if r_new.float_fallbacks == 0:
            save_model(new, path)
    write_result("relayout_qat_models", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
