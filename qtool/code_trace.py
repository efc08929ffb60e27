"""Where a fake-quant module and onnxruntime part: quantized activation by activation, in graph order.

A QAT run whose outputs differ from onnxruntime's needs the first tensor whose codes differ, not the
outputs' difference: every later tensor inherits it, and a LayerNormalization or a Softmax turns a
one-code difference into many. `code_divergence` runs the QDQ model once on onnxruntime (optimized,
as deployed) with every activation's QuantizeLinear output added as a graph output, and the lifted
module once in eval mode, and compares the integer codes tensor by tensor.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import torch
from onnx import TensorProto

from qtool.plan import QuantPlan

__all__ = ["code_divergence", "first_divergence"]


def code_divergence(qmodel: onnx.ModelProto, lifted, plan: QuantPlan, feeds: dict[str, np.ndarray],
                    names: dict[str, str] | None = None) -> list[dict]:
    """Per quantized activation of `plan` (graph order): {tensor, max_codes, fraction, elements}.

    `lifted`: the fake-quant LiftedModule (put in eval mode here); `names`: the plan's (fused graph's)
    tensor name -> the lifted graph's, where they differ."""
    from qtool.evaluation import make_session

    q_of: dict[str, str] = {}
    for n in qmodel.graph.node:
        if n.op_type != "QuantizeLinear":
            continue
        # a graph output's Q reads NAME_float (the DQ took the output's name); the Q node keeps NAME's
        t = n.name[:-len("_QuantizeLinear")] if n.name.endswith("_QuantizeLinear") else n.input[0]
        if t in plan.tensors and plan.tensors[t].kind == "activation":
            q_of.setdefault(t, n.output[0])
    m = copy.deepcopy(qmodel)
    have = {o.name for o in m.graph.output}
    for t, q in q_of.items():
        if q not in have:
            dt = TensorProto.INT8 if plan.tensors[t].signed else TensorProto.UINT8
            m.graph.output.append(onnx.helper.make_tensor_value_info(q, dt, None))
    sess = make_session(m)
    wanted = list(q_of.values())
    ort_codes = dict(zip(wanted, sess.run(wanted, feeds)))
    lifted.eval()
    with torch.no_grad():
        env = lifted.values(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    rows = []
    for t, q in q_of.items():
        v = env.get((names or {}).get(t, t))
        if v is None:
            continue
        tq = plan.tensors[t]
        lo, hi = tq.qrange
        s, z = np.float32(tq.scale), int(tq.zero_point)
        ours = np.rint(v.float().cpu().numpy() / s) + z
        theirs = np.clip(ort_codes[q].astype(np.float64), lo, hi)  # sub-8-bit: the Clip after the Q narrows
        if ours.shape != theirs.shape:
            continue
        d = np.abs(ours - theirs)
        rows.append({"tensor": t, "max_codes": float(d.max()) if d.size else 0.0,
                     "fraction": float((d > 0).mean()) if d.size else 0.0, "elements": int(d.size)})
    return rows


def first_divergence(rows: list[dict]) -> str | None:
    """One line naming the first tensor whose codes differ and the one that differs most; None if none do."""
    bad = [r for r in rows if r["max_codes"] > 0]
    if not bad:
        return None
    first, worst = bad[0], max(bad, key=lambda r: r["max_codes"])
    line = (f"first differing tensor {first['tensor']!r} (up to {first['max_codes']:.0f} codes on "
            f"{100 * first['fraction']:.2f} % of its elements)")
    if worst is not first:
        line += f", most: {worst['tensor']!r} ({worst['max_codes']:.0f} codes)"
    return line
