"""Markdown from the benchmark JSONs: each benchmark's table (results/NAME.md) and benchmarks/RESULTS.md.

    python -m benchmarks results            # writes benchmarks/RESULTS.md from benchmarks/results/*.json
    python -m benchmarks results --tables   # also rewrites results/NAME.md next to every JSON it reads
    python -m benchmarks results -o FILE [--results DIR]

Every number comes from a JSON that a benchmark script wrote (benchmarks.common.write_result); nothing
here is typed by hand, so rerunning a benchmark and then this command keeps the page true. The scripts
write their own NAME.md through `write_table` when they finish. One-off experiments are not here: their
measured results are in docs/FINDINGS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
RESULTS_MD = ROOT / "RESULTS.md"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.2f}"


def _pp(x: float | None) -> str:
    return "—" if x is None else f"{x:+.2f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _runs(bits: list) -> str:
    """Per-layer bits with repeats folded: [8, 4, 4, 4, 3] -> '8, 4×3, 3'."""
    out, i = [], 0
    while i < len(bits):
        j = i
        while j < len(bits) and bits[j] == bits[i]:
            j += 1
        out.append(f"{bits[i]}×{j - i}" if j - i > 1 else str(bits[i]))
        i = j
    return ", ".join(out)


def _machine(d: dict) -> str:
    m = d.get("machine") or {}
    return (f"Run of {m.get('date', '?')} on {m.get('cpu_count', '?')} CPU cores, onnxruntime "
            f"{m.get('onnxruntime', '?')}, torch {m.get('torch', '?')}.")


# ------------------------------------------------------------------------------------------ tables

def suite_table(results: dict) -> str:
    """benchmarks.suite: latency of FP32 / quantize_static / qtool INT8 (and the QAT models) per batch."""
    lines = ["| model | batch | FP32 ms | ORT quantize_static ms | qtool INT8 ms | qtool / ORT | qtool INT8 / FP32 "
             "| qtool float fallbacks | top-1 FP32 / ORT / qtool |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in results["models"].items():
        top = r.get("top1")
        acc = " / ".join(f"{top[k] * 100:.2f}" for k in ("fp32", "ort_int8", "qtool_int8")) if top else "— (random weights)"
        for b, rows in r["latency"].items():
            lines.append(f"| {key} | {b[5:]} | {rows['fp32']['median_ms']:.3f} | {rows['ort_int8']['median_ms']:.3f} | "
                         f"{rows['qtool_int8']['median_ms']:.3f} | {rows['ratios']['qtool_over_ort']:.2f} | "
                         f"{rows['ratios']['qtool_int8_over_fp32']:.2f} | "
                         f"{r['kernels']['qtool_int8']['float_fallbacks']} | {acc} |")
    qat_rows = [(key, b, v, rows) for key, r in results["models"].items() for b, rows in r["latency"].items()
                for v in rows if v.startswith("qtool_qat")]
    if qat_rows:
        lines += ["", "| QAT model (same run) | batch | ms | vs FP32 | vs qtool PTQ INT8 | top-1 | float fallbacks |",
                  "|---|---|---|---|---|---|---|"]
        for key, b, v, rows in qat_rows:
            r = results["models"][key]
            ms = rows[v]["median_ms"]
            lines.append(f"| {key} {v[6:]} | {b[5:]} | {ms:.3f} | {ms / rows['fp32']['median_ms']:.2f} | "
                         f"{ms / rows['qtool_int8']['median_ms']:.2f} | {r['top1'][v] * 100:.2f} | "
                         f"{r['kernels'][v]['float_fallbacks']} |")
    s = results["settings"]
    lines.append("")
    lines.append(f"Median latency, onnxruntime {s['onnxruntime']} CPU EP, {s['threads']} threads, "
                 f"{'quick' if s['quick'] else 'full'} run of {s['date']}; {s['wall_s']:.0f} s in all. "
                 "Ratios < 1 mean qtool is faster.")
    return "\n".join(lines) + "\n"


def train_table(d: dict) -> str:
    """benchmarks.train_resnet20: FP32 training and the ONNX export's accuracy on onnxruntime."""
    c = d["config"]
    lines = _table(["model", "epochs", "batch", "optimizer", "peak lr", "wall time (min)", "val top-1 PyTorch",
                    "val top-1 ONNX on ORT", "ORT vs PyTorch (pp)"],
                   [[c["model"], d["epochs"], c["batch_size"], c.get("optimizer", "sgd"), c["lr"],
                     f"{d['wall_time_s'] / 60:.1f}",
                     _pct(d["val_acc_torch"]), _pct(d["val_acc_onnx"]), f"{d['onnx_vs_torch_gap_pp']:.2f}"]])
    return "\n".join(lines + ["", f"Data: {d['data']}. " + _machine(d)]) + "\n"


def qat_table(d: dict) -> str:
    """benchmarks.qat: fake-quant vs onnxruntime per QAT configuration, and the drop from FP32."""
    s = d["settings"]
    key = next(k for k, v in d.items() if isinstance(v, dict) and "fp32_acc" in v)
    r = d[key]
    rows = [[name[4:], _pct(v["acc_fakequant"]), _pct(v["acc_ort"]), _pp(v["fidelity_diff_pp"]),
             f"{v['argmax_agreement'] * 100:.2f} %", f"{v['logit_max_diff_steps']:.1f}", _pp(v["drop_pp_vs_fp32"]),
             f"{v['wall_time_s']:.0f}"]
            for name, v in r.items() if name.startswith("qat_") and isinstance(v, dict)]
    lines = [f"Model {key}: FP32 {_pct(r['fp32_acc'])} %, qtool PTQ W8A8 {_pct(r['ptq_w8a8_acc'])} % on "
             f"{s['val_images']} val images. QAT: {s['epochs']} epoch x {s['train_limit']} images, batch "
             f"{s['batch_size']}, {s['optimizer']}, lr {s['lr']}"
             + (", loss: KL to the FP32 model's logits" if s.get("loss") == "distill" else "") + "; "
             + ("each QAT row starts at the PTQ plan of its bits (its bits, scales and zero points)."
                if s.get("qat_from") == "ptq plan" else
                f"W4A4 rows keep the first and last layer at {s['first_last_bits']} bits."), ""]
    lines += _table(["QAT", "top-1 fake-quant", "top-1 ORT", "fake-quant − ORT (pp)", "argmax agreement",
                     "max logit diff (quant. steps)", "drop vs FP32 (pp)", "wall (s)"], rows)
    ptq = [[name[4:], _pct(v["acc_ort"]), _pp(v["drop_pp_vs_fp32"])] for name, v in r.items()
           if name.startswith("ptq_w") and isinstance(v, dict)]
    if ptq:
        lines += ["", *_table(["PTQ (qtool quantize, same calibration)", "top-1 ORT", "drop vs FP32 (pp)"], ptq)]
    return "\n".join(lines + ["", _machine(d)]) + "\n"


def export_table(d: dict) -> str:
    """benchmarks.export: one PTQ plan in every format; QAT plans; intsim vs ORT; packed INT4 weights."""
    s = d["settings"]
    top = d.get("top1") or {}
    diff = d.get("top1_diff_vs_plan_qdq_pp") or {}
    dis = d["top1_disagreements_vs_qdq"]
    rows = [[fmt, _pct(top.get(fmt)), _pp(diff.get(fmt)), r["integer_compute"], r["float_fallbacks"], r["size_bytes"],
             dis[fmt], f"{d['max_logit_diff_vs_qdq_steps'][fmt]:.1f}"] for fmt, r in d["w8a8"].items()]
    lines = [f"Plan: {s['plan']}; {s['calibration_images']} calibration images; top-1 on {s['val_images']}. "
             f"FP32 {_pct(top.get('fp32'))} %, the plan's QDQ model {_pct(top.get('qdq_plan'))} %.", ""]
    lines += _table(["format", "top-1 ORT", "vs plan QDQ (pp)", "integer kernels", "float fallbacks", "bytes",
                     f"top-1 disagreements vs QDQ ({dis['images']} images)", "max logit diff vs QDQ (steps)"], rows)
    if d.get("qat"):
        fmts = ("qdq", "qoperator", "integer")
        lines += ["", *_table(["QAT plan", "fake-quant top-1", *[f"{f} top-1 (vs fake-quant pp)" for f in fmts],
                               "float fallbacks (qdq / qoperator / integer)"],
                              [[q["config"], _pct(q["acc_fakequant"]),
                                *[f"{_pct(q[f]['acc_ort'])} ({_pp(q[f]['diff_vs_fakequant_pp'])})" for f in fmts],
                                " / ".join(str(q[f]["float_fallbacks"]) for f in fmts)] for q in d["qat"].values()])]
    i = d["intsim_vs_ort"]
    w = d["w4a8_int4_weights"]
    lines += ["", f"qtool.intsim vs onnxruntime on the integer model, {i['images']} images: {i['top1_disagreements']} "
                  f"top-1 disagreements, {i['logits_not_bit_equal']} logits not bit-equal (max |diff| "
                  f"{i['max_abs_logit_diff']:g}).",
              f"W4A8 plan, QDQ: int8 containers {w['int8_container_bytes']} bytes "
              f"({w['int8_container_kernels']['integer_compute']} integer kernels, "
              f"{w['int8_container_kernels']['float_fallbacks']} float fallbacks) vs packed INT4 "
              f"{w['int4_packed_bytes']} bytes, {w['ratio']:.2f}x smaller "
              f"({w['int4_packed_kernels']['integer_compute']} integer kernels, "
              f"{w['int4_packed_kernels']['float_fallbacks']} float fallbacks); `--int4-weights auto` "
              f"{'packs' if w['auto_packed'] else 'keeps int8 containers'}.", "", _machine(d)]
    return "\n".join(lines) + "\n"


def search_table(d: dict) -> str:
    """benchmarks.search: cost of the search, hypervolume vs random search, the fine-tune comparison."""
    s, srch, hv, fine = d["settings"], d["search"], d["hypervolume"], d["finetune"]
    sup = s.get("supernet", {})
    uni = ", ".join(f"{k.upper()} {_pct(v)} %" for k, v in srch["supernet_uniform_acc"].items())
    lines = [f"Setup {d['setup']}: {d['space']['searched']} of {d['space']['layers']} layers searched over bits "
             f"{d['space']['bits']}; NSGA-III pop {s['pop']} x {s['gens']} generations, {s['workers']} workers; "
             f"supernet {s['supernet_steps']} sandwich steps (small end "
             f"{sup.get('sandwich_low') or min(d['space']['bits'])} bits), {s['val_images']} val images per candidate.",
             "",
             *_table(["evaluations", "search wall (min)", "of which supernet (min)", "hypervolume NSGA-III",
                      "hypervolume random search (same evaluations)"],
                     [[srch["evaluations"], f"{srch['wall_s'] / 60:.1f}", f"{(srch['supernet_train_s'] or 0) / 60:.1f}",
                       f"{hv['nsga3']:.3f}", f"{hv['random']:.3f}"]]),
             "", f"Supernet top-1 of the uniform configurations: {uni}.", "",
             f"Fine-tune: {s['finetune_steps']} steps of batch 128 from "
             f"{'the supernet' if s.get('finetune_init') == 'supernet' else 'the FP32 weights'} on "
             f"{s['finetune_device']}, lr {s['finetune_lr']}, mean of {s.get('finetune_seeds', 1)} seed(s)"
             f"{', FP32 soft labels at weight ' + str(s['finetune_distill']) if s.get('finetune_distill') else ''}; "
             f"top-1 on {s['finetune_val_images']} val images.", ""]
    rows = []
    for c in fine["comparisons"]:
        rows.append([f"uniform {c['baseline']} (baseline)", _pct(c["baseline_supernet_acc"]), _pct(c["baseline_acc"]),
                     "1.00", "", ""])
        for m in c["members"]:
            v = m.get("vs_baseline")
            ci = f"{_pp(v['diff_pp'])} [{_pp(v['ci95_pp'][0])}, {_pp(v['ci95_pp'][1])}]" if v else \
                _pp((m["member_acc"] - c["baseline_acc"]) * 100)
            rows.append([f"front member vs {c['baseline']}", _pct(m["member_supernet_acc"]), _pct(m["member_acc"]),
                         f"{m['member_bitops'] / c['baseline_bitops']:.2f}", ci, "yes" if m["dominates"] else "no"])
    for c in fine["candidates"]:
        if c["role"].endswith("(reference)"):
            rows.append([c["role"], _pct(c["supernet_acc"]), _pct(c["finetuned_acc"]), "", "", ""])
    lines += _table(["candidate", "supernet top-1", "fine-tuned top-1", "BitOps / baseline",
                     "member − baseline (pp) [95 % CI over val images]", "dominates"], rows)
    tau = fine.get("kendall_tau_supernet_vs_finetuned")
    lines += ["", f"Kendall tau, supernet vs fine-tuned top-1: {'—' if tau is None else f'{tau:.2f}'}. " + _machine(d)]
    return "\n".join(lines) + "\n"


def dynamic_table(d: dict) -> str:
    """benchmarks.dynamic: the deployed dynamic model vs static QAT at the same average BitFLOPs."""
    c, dyn = d["config"], d["dynamic"]
    rows = [["dynamic (deployed)", f"{dyn['codebook_size']} configurations", f"{dyn['avg_bitflops'] / 1e6:.0f}",
             _pct(dyn["acc_ort"]), _pct(dyn["acc_torch"])]]
    rows += [[f"static {s['name']}", _runs(s["bits"]) if isinstance(s["bits"], list) else s["bits"],
              f"{s['bitflops'] / 1e6:.0f}", _pct(s["acc_ort"]), _pct(s["acc_torch"])] for s in d["static"]]
    lines = [f"Bits {c['bits']}, target {d.get('target_bitflops', 0) / 1e6:.0f} M BitFLOPs ({c['target']}), "
             f"{c['train_limit']} training images x {c['epochs']} epoch, {c['budget']} budget, "
             f"{c.get('val_limit') or 'all'} val images, trained on {d.get('torch_device') or 'cpu'}.", ""]
    lines += _table(["model", "bits (per layer)", "BitFLOPs (M)", "top-1 ORT", "top-1 PyTorch"], rows)
    curve = d.get("dynamic_minus_uniform_curve_pp")
    lines += ["", f"Dynamic − static (matched) on ORT: {_pp(d['dynamic_minus_static_matched_pp'])} pp; vs the uniform "
                  f"static curve: {'— (no uniform rows)' if curve is None else _pp(curve) + ' pp'}. ORT − PyTorch: "
                  f"{_pp(dyn['ort_minus_torch_pp'])} pp, prediction agreement {dyn['prediction_agreement'] * 100:.2f} %."]
    r = d.get("routing")
    if r:
        lines.append(f"Routing on ORT: deployed {_pct(r['deployed']['acc'])} % vs shuffled across images "
                     f"{_pct(r['shuffled']['acc_mean'])} % ({_pp(r['routing_gain_pp'])} pp); oracle at the same "
                     f"BitFLOPs {_pct(r['oracle']['acc'])} %; best single configuration {_pct(r['best_single']['acc'])} %.")
    lat = d.get("latency")
    if lat:
        lines.append("Routing latency (dynamic / static, ORT CPU EP, "
                     f"intra-op threads {lat['threads']}): " + ", ".join(
                         f"batch {k[5:]} x{v['dynamic_over_static']:.2f}" for k, v in lat.items()
                         if k.startswith("batch")) + ".")
    return "\n".join(lines + ["", _machine(d)]) + "\n"


def calibration_table(d: dict) -> str:
    """benchmarks.calibration: qtool vs onnxruntime quantize_static per calibration method: top-1 and time."""
    fp = d["fp32_top1"]
    rows = []
    for m, r in d["methods"].items():
        q, o = r["qtool"], r["ort"]
        rows.append([m, _pct(q["top1"]), _pp((q["top1"] - fp) * 100), _pct(o and o["top1"]),
                     _pp(o and (o["top1"] - fp) * 100), _pct(q["top1_float_kernels"]),
                     _pct(o and o["top1_float_kernels"]), f"{q['seconds']:.1f}",
                     f"{o['seconds']:.1f}" if o else "—", f"{r['qtool_over_ort_time']:.2f}" if o else "—"])
    lines = [f"Model {d['model']}, W8A8 (U8S8, per-channel weights), {d['calibration_images']} calibration images, "
             f"top-1 on {d['val_images']} val images; FP32 {_pct(fp)} %. Time: best of {d['repeats']}, the tools "
             "interleaved.", ""]
    lines += _table(["method", "qtool top-1", "qtool − FP32 (pp)", "ORT top-1", "ORT − FP32 (pp)",
                     "qtool float kernels", "ORT float kernels", "qtool s", "ORT s", "qtool / ORT time"], rows)
    lines += ["", "Float kernels: the same QDQ models with onnxruntime's graph optimizations off (Q/DQ around float "
              "Conv), free of the U8S8 saturation of CPUs without VNNI."]
    lines += ["", f"qtool's default ({d['qtool_phases_s'][0]['method']}) vs onnxruntime's default (MinMax): "
              f"time x{d['default_vs_default_time']:.2f}.", ""]
    lines += _table(["qtool phase (s)", "fuse", "calibration run", "of which inference + min/max", "plan (range search)",
                     "insert Q/DQ"],
                    [[p["method"], *(f"{p[k]:.2f}" for k in ("fuse", "calibration_run", "of_which_inference_and_minmax",
                                                            "plan_incl_range_search", "insert_qdq"))]
                     for p in d["qtool_phases_s"]])
    return "\n".join(lines + ["", _machine(d)]) + "\n"


def _zoo_cov(v: dict | None) -> str:
    c = (v or {}).get("coverage")
    return "—" if not c else f"{c['integer']}/{c['compute']}"


def _zoo_db(v: dict | None) -> str:
    s = (v or {}).get("sqnr")
    return "—" if not s else f"{s['min_sqnr_db']:.1f}"


def _zoo_ms(v: dict | None, fp32_ms: float | None) -> str:
    ms = (v or {}).get("latency_ms")
    if ms is None:
        return "—"
    return f"{ms:.2f} ({ms / fp32_ms:.2f}x)" if fp32_ms else f"{ms:.2f}"


def _zoo_failed(step: dict | None) -> str:
    if step is None:
        return "not run"
    if step.get("status"):
        return step["status"]
    return "failed: " + (step.get("error") or f"exit {step.get('rc')}").replace("|", "/")[:90]


def _zoo_mark(t: bool | None) -> str:
    return "—" if t is None else ("yes" if t else "**no**")


def zoo_table(d: dict) -> str:
    """benchmarks.zoo: qtool's CLI vs onnxruntime quantize_static (and quantize_dynamic) on the zoo."""
    rows, dyn_rows = [], []
    for key, m in d["models"].items():
        if "build_error" in m:
            rows.append([key, "build failed: " + m["build_error"][:80], *[""] * 10])
            continue
        st, v, t = m["steps"], m["variants"], m["targets"]
        ref = m["ort_reference"]
        fp = v["fp32"].get("latency_ms")
        codes = "/".join("—" if st.get(s) is None else str(st[s]["rc"]) for s in ("fuse", "quantize", "eval", "bench"))
        q = v.get("qtool")
        qcell = lambda f: f(q) if q else _zoo_failed(st.get("quantize"))
        ocell = lambda f: f(v[ref]) if ref else "ORT failed"
        nopre = v.get("ort_nopre")
        pre_note = "" if st["ort"]["rc"] == 0 else f" (pre_process {_zoo_failed(st['ort'])}; ref = without)"
        nopre_cell = (f"{_zoo_cov(nopre)}, {_zoo_db(nopre)} dB, {_zoo_ms(nopre, fp)}" if nopre
                      else _zoo_failed(st["ort_nopre"]))
        lr, tr = t.get("latency_qtool_over_ort"), t.get("quantize_qtool_over_ort")
        qs = m["quantize_s"]
        qt = qs["qtool_fuse"] + (qs["qtool_quantize"] or 0)
        held = [name for name, k in (("cov", "coverage"), ("SQNR", "sqnr"), ("lat", "latency_ratio"),
                                     ("time", "quantize_time_ratio")) if t.get(k) is False]
        rows.append([key, codes, f"{qcell(_zoo_cov)} vs {ocell(_zoo_cov)}", f"{qcell(_zoo_db)} vs {ocell(_zoo_db)}",
                     f"{fp:.2f}" if fp else "—", qcell(lambda x: _zoo_ms(x, fp)),
                     (ocell(lambda x: _zoo_ms(x, fp)) + pre_note), "—" if lr is None else f"{lr:.2f}",
                     f"{qt:.1f} vs {st[ref]['seconds']:.1f}" if ref else f"{qt:.1f} vs —",
                     "—" if tr is None else f"{tr:.2f}", nopre_cell,
                     ("all" if not held and t.get("coverage") is not None else
                      ("missed: " + ", ".join(held) if held else "— (no ORT)"))
                     + ("" if t.get("pipeline_exit_0") else "; pipeline exit != 0")])
        if "qtool_dynamic" in st:
            qd, od = v.get("qtool_dynamic"), v.get("ort_dynamic")
            r = (qd["latency_ms"] / od["latency_ms"]) if qd and od and qd.get("latency_ms") and od.get("latency_ms") \
                else None
            dyn_rows.append([key, _zoo_ms(qd, fp) if qd else _zoo_failed(st["qtool_dynamic"]),
                             _zoo_db(qd) if qd else "—",
                             _zoo_ms(od, fp) if od else _zoo_failed(st.get("ort_dynamic")), _zoo_db(od) if od else "—",
                             "—" if r is None else f"{r:.2f}"])
    s, sm = d["settings"], d["summary"]
    g = sm.get("latency_geomean_qtool_over_ort")
    held, cmp_ = sm["targets_held"], sm["targets_compared"]
    lines = [f"{sm['models']} models, batch 1, {s['threads']} threads, {s['runs']} timed runs (medians, one `qtool "
             f"bench` run per model); {s['calibration_samples']} calibration and {s['test_samples']} held-out test "
             "samples per model. ORT = onnxruntime `quantize_static` (QDQ, its defaults) after `quant_pre_process` "
             "(without it where pre-processing fails). Exit codes: fuse / quantize / eval / bench.", ""]
    lines += _table(["model", "exit codes", "int kernels qtool vs ORT", "SQNR dB qtool vs ORT (worst output)",
                     "FP32 ms", "qtool ms (x FP32)", "ORT ms (x FP32)", "qtool / ORT latency",
                     "quantize s qtool vs ORT", "time ratio", "ORT without pre_process: kernels, SQNR, ms",
                     "targets"], rows)
    lines += ["", f"Geometric mean of qtool / ORT latency: {'—' if g is None else f'{g:.3f}'} (target <= 0.95: "
                  f"{_zoo_mark(sm.get('latency_geomean_target_held'))}). Targets held (of models compared): "
                  + ", ".join(f"{name} {held[k]}/{cmp_[k]}" for name, k in
                              (("pipeline exit 0", "pipeline_exit_0"), ("coverage >= ORT", "coverage"),
                               ("SQNR >= ORT", "sqnr"), ("latency <= ORT", "latency_ratio"),
                               ("quantize time <= 1.5x", "quantize_time_ratio"))) + "."]
    if dyn_rows:
        dg = sm.get("dynamic_latency_geomean_qtool_over_ort")
        lines += ["", *_table(["model (dynamic activations)", "qtool --activations dynamic ms (x FP32)", "SQNR dB",
                               "ORT quantize_dynamic ms (x FP32)", "SQNR dB", "qtool / ORT latency"], dyn_rows),
                  "", f"Geometric mean qtool / ORT (dynamic): {'—' if dg is None else f'{dg:.3f}'}."]
    lines += ["", f"{'Quick' if s['quick'] else 'Full'} run, {s['wall_s'] / 60:.1f} min in all. " + _machine(d)]
    return "\n".join(lines) + "\n"


def lowbit_table(d: dict) -> str:
    """benchmarks.lowbit: qtool mse / AdaRound / + bias correction vs AIMET QuantSim / AdaRound at W4A8, W4A4."""
    fp = d["fp32_top1"]
    brecq = (f"; qtool's BRECQ at {d['brecq_iterations']} iterations per block" if "brecq_iterations" in d
             and any("brecq" in t for tools in d["bits"].values() for t in tools) else "")
    lines = [f"Model {d['model']} (BN folded), {d['calibration_images']} calibration images, AdaRound on "
             f"{d['adaround_samples']} of them at {d['adaround_iterations']} iterations per layer (both tools){brecq}; "
             f"top-1 on onnxruntime on {d['val_images']} val images; FP32 {_pct(fp)} %.", ""]
    rows = []
    for bits, tools in d["bits"].items():
        for tool, r in tools.items():
            if "error" in r:
                rows.append([bits, tool, "failed: " + " ".join(r["error"])[:80], "—", "—"])
                continue
            rows.append([bits, tool, _pct(r["top1"]), _pp((r["top1"] - fp) * 100), f"{r['seconds']:.1f}"])
    lines += _table(["bits", "tool", "top-1", "− FP32 (pp)", "wall s"], rows)
    if not d.get("aimet_available", True):
        lines += ["", "AIMET rows absent: no AIMET interpreter on this machine."]
    return "\n".join(lines + ["", _machine(d)]) + "\n"


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.2f}"


def nbits_table(d: dict) -> str:
    """benchmarks.nbits: FP32, qtool int8, qtool MatMulNBits (RTN / GPTQ) and onnxruntime's MatMulNBitsQuantizer."""
    s = d["settings"]
    lines = [f"Batch 1, {s['threads']} threads, medians of {s['runs']} runs (all variants of a model in one bench); "
             f"SQNR of the output vs FP32 on {s['test_samples']} held-out samples, {s['calibration_samples']} "
             "calibration samples. Random-weight models (zoo builders): SQNR says how closely each variant tracks "
             "its own FP32 model, not task accuracy. The RTN and GPTQ rows of one scheme have the same graph and "
             "bytes: their latency gap is this shared machine's timing noise.", ""]
    for key, m in d["models"].items():
        rows = []
        for v, r in m["variants"].items():
            if "error" in r:
                rows.append([r["label"], "failed: " + r["error"][:90], "—", "—", "—", "—"])
                continue
            db = r.get("sqnr", {}).get("min_sqnr_db")
            lat = r.get("latency_ms")
            ops = ", ".join(f"{k} {n}" for k, n in sorted(r.get("ops", {}).items()))
            rows.append([r["label"], _mb(r.get("size_bytes")),
                         "—" if lat is None else f"{lat:.2f} (x{r['latency_ratio']:.2f})",
                         "—" if db is None else f"{db:.2f}",
                         "—" if r.get("quantize_s") is None else f"{r['quantize_s']:.1f}", ops])
        lines += [f"**{key}** ({m['data']})", "",
                  *_table(["variant", "size MB", "latency ms (x FP32)", "SQNR dB", "quantize s", "MatMul-type nodes"],
                          rows), ""]
    return "\n".join(lines + [_machine(d)]) + "\n"


def _ms_vs(ms: float | None, fp32_ms: float | None) -> str:
    """A latency cell: ms, and its ratio to FP32's when known."""
    return "—" if ms is None else f"{ms:.3f}" + (f" ({ms / fp32_ms:.2f}x)" if fp32_ms else "")


def _failed_row(tool: str, r: dict, width: int) -> list:
    return [tool, "failed: " + " ".join(r["error"])[:80]] + ["—"] * width


def _halves(r: dict) -> list:
    """Top-1 and its change from FP32 on the control and the held-out images (accuracy_control cells)."""
    return [c for k in ("control", "held_out") for c in (_pct(r["top1"][k]), _pp(-r["drop_pp"][k]))]


def _counts(choices: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(choices.items()))


def _peer_notes(d: dict) -> list[str]:
    """The notes under a side-by-side table: a peer's row missing, a smoke run."""
    return ((["", "NNCF row absent: no NNCF interpreter on this machine."] if not d.get("nncf_available", True) else [])
            + (["", "Quick run (small val slice): a smoke test of the benchmark, not a result."] if d.get("quick")
               else []))


def kept_gains(d: dict) -> list[tuple[str, str]]:
    """Per accuracy-control row, the share it keeps of uniform INT8's latency gain over FP32 (none where INT8
    is not faster) and of uniform W4A8's size gain (INT4 packed), the issue's two yardsticks."""
    rows, fp = d["rows"], d.get("fp32", {})
    i8, w4 = rows.get("qtool W8A8 (uniform)", {}), rows.get("qtool W4A8 (uniform)", {})
    if "latency_ms" not in fp or "latency_ms" not in i8 or "int4_packed_bytes" not in w4:
        return []
    lat_gain, size_gain = fp["latency_ms"] - i8["latency_ms"], fp["size_bytes"] - w4["int4_packed_bytes"]
    out = []
    for t, r in rows.items():
        if "(uniform)" in t or "error" in r or "latency_ms" not in r:
            continue
        size = (fp["size_bytes"] - r.get("int4_packed_bytes", r["size_bytes"])) / size_gain
        kept = (fp["latency_ms"] - r["latency_ms"]) / lat_gain if lat_gain > 0 else None
        lat = ("no latency gain to keep (INT8 slower than FP32)" if kept is None
               else "none of the latency gain (slower than FP32)" if kept < 0 else f"{kept:.0%} of the latency gain")
        out.append((t, f"{lat}, {size:.0%} of the size gain"))
    return out


def accuracy_control_table(d: dict) -> str:
    """benchmarks.accuracy_control: uniform W8A8 / W4A8, qtool --max-drop, NNCF quantize_with_accuracy_control."""
    fp, fl = d["fp32_top1"], d.get("fp32", {}).get("latency_ms")
    lines = [f"Model {d['model']} (BN folded), {d['calibration_images']} calibration images; both accuracy controls "
             f"tune on {d['control_images']} val images (control) with a {d['max_drop_pp']:g} pp budget, and every "
             f"model is also scored on {d['held_out_images']} other val images (held out); FP32 top-1 "
             f"{_pct(fp['control'])} / {_pct(fp['held_out'])} %"
             + (f", {fl:.3f} ms" if fl else "") + ". Latency: median, batch 1, 2 threads, interleaved.", ""]
    rows = []
    for tool, r in d["rows"].items():
        if "error" in r:
            rows.append(_failed_row(tool, r, 7))
            continue
        if "choices" in r:
            units = _counts(r["choices"])
        elif "units_float" in r:
            units = f"float {r['units_float']}, int8 {r['units_quantized']}"
        else:
            units = "uniform"
        lat = _ms_vs(r.get("latency_ms"), fl)
        size = f"{r['size_bytes'] / 1024:.0f}" + (f" ({r['int4_packed_bytes'] / 1024:.0f})" if "int4_packed_bytes" in r
                                                   else "")
        rows.append([tool, *_halves(r), units, lat, size, f"{r['seconds']:.1f}"])
    lines += _table(["tool", "top-1 control", "− FP32 (pp)", "top-1 held-out", "− FP32 (pp)", "units",
                     "latency ms (x FP32)", "size KiB (INT4 packed)", "wall s"], rows)
    gains = kept_gains(d)
    if gains:
        lines += ["", "Of the gains over FP32 of uniform INT8 (latency) and uniform W4A8 (size, INT4 packed), each "
                      "accuracy control keeps: " + "; ".join(f"`{t.removeprefix('qtool ')}` {g}" for t, g in gains)
                  + "."]
    bounds = [(t, r["final_bound_pp"]) for t, r in d["rows"].items() if r.get("final_bound_pp") is not None]
    if bounds:
        lines += ["", "; ".join(f"`{t.removeprefix('qtool ')}`: the control drop's one-sided upper confidence bound "
                                f"{b:.2f} pp" for t, b in bounds) + " (the budget is checked on it)."]
    se = d.get("search")
    if se:
        lines += ["", f"`{se['command']}`: {se['evaluated']} evaluations in {se['seconds']:.0f} s; each front member "
                      "measured like the rows above (latency in the same interleaved run):", ""]
        lines += _table(["front member", "top-1 control", "− FP32 (pp)", "top-1 held-out", "− FP32 (pp)", "units",
                         "latency ms (x FP32)", "size KiB (INT4 packed)"],
                        [[m["name"], *_halves(m), _counts(m["choices"]), _ms_vs(m.get("latency_ms"), fl),
                          f"{m['size_bytes'] / 1024:.0f}" + (f" ({m['int4_packed_bytes'] / 1024:.0f})"
                                                             if "int4_packed_bytes" in m else "")]
                         for m in se["front"]])
    lines += _peer_notes(d)
    return "\n".join(lines + ["", _machine(d)]) + "\n"


def _qz_db(r: dict, k: str) -> str:
    return f"{r[k]['min_sqnr_db']:.2f}" if k in r else "—"


def qat_zoo_table(d: dict) -> str:
    """benchmarks.qat_zoo: W8A8 / W4A8 QAT (loss distill, unlabeled) per zoo architecture: SQNR before / after,
    fake-quant vs onnxruntime steps and argmax agreement, the fidelity gate; the QAT step speed table."""
    s = d.get("settings") or {}
    lines = []
    if d.get("models"):
        lines += [f"{s.get('train_samples')} unlabeled train samples ({s.get('epochs')} epochs, batch {s.get('batch')}, "
                  f"loss {s.get('loss')}, {s.get('algo')}), SQNR vs FP32 (worst output, dB) on {s.get('test_samples')} "
                  "held-out samples; before = `qtool quantize` (PTQ defaults), after = `qtool qat` with the PTQ plan's "
                  "bits. Fidelity: max |fake-quant - onnxruntime| in quantization steps over the outputs and the "
                  "lowest argmax agreement, on qat's val split (10 % of the train samples).", ""]
        rows = []
        for key, m in d["models"].items():
            if "error" in m:
                rows.append([key, "—", ("not run: " if m["error"].startswith("no bits") else "failed: ") + m["error"][:120], "", "", "", "", "", ""])
                continue
            for bits in m.get("incomplete") and [b for b in ("w8a8", "w4a8") if b not in m["bits"]] or []:
                rows.append([key, bits, "—", "not run: " + "; ".join(m["incomplete"])[:100], "", "", "", "", ""])
            for bits, r in m["bits"].items():
                f = r.get("fidelity") or {}
                q = r["qat_step"]
                ag = f.get("min_argmax_agreement")
                rows.append([key, bits, _qz_db(r, "before") if "before" in r else "failed: " + r["ptq_step"].get("error", "")[:80],
                             _qz_db(r, "after") if "after" in r else "failed: " + q.get("error", "")[:120],
                             "—" if f.get("max_steps") is None else f"{f['max_steps']:.2f}",
                             "—" if ag is None else f"{ag * 100:.1f}", f.get("gate", "—"), q["rc"], "—" if q.get("seconds") is None else f"{q['seconds']:.0f}"])
        lines += _table(["model", "bits", "SQNR before (PTQ)", "SQNR after (QAT)", "max steps", "argmax agree %",
                         "gate", "qat exit", "qat s"], rows)
        sm = d.get("summary") or {}
        lines += ["", f"QAT exit 0 in {sm.get('qat_exit_0')} of {sm.get('runs')} runs; gate passed in "
                      f"{sm.get('gate_passed')}; 0 steps in {sm.get('zero_steps')}; SQNR improved in {sm.get('improved')}."]
        where = [f"- {key} {bits}: {r['fidelity']['first_divergence']}" for key, m in d["models"].items()
                 for bits, r in m.get("bits", {}).items() if (r.get("fidelity") or {}).get("first_divergence")]
        if where:
            lines += ["", "Where fake-quant and onnxruntime part (the gate's trace, qtool.code_trace):", *where]
    sp = d.get("speed")
    if sp:
        lines += ["", sp.get("note", ""), ""]
        rows = [[r["model"], r["batch"], r["variant"], "—" if r.get("step_s") is None else f"{r['step_s']:.3f}",
                 "—" if r.get("compile_s") is None else f"{r['compile_s']:.0f}",
                 "—" if r.get("vs_eager") is None else f"{r['vs_eager']:.2f}",
                 "—" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.2g}",
                 "—" if r.get("fp32_max_abs_diff") is None else f"{r['fp32_max_abs_diff']:.2g}",
                 "—" if r.get("peak_rss_gib") is None else f"{r['peak_rss_gib']:.1f}", r.get("error", "")[:100]]
                for r in sp["rows"]]
        lines += _table(["model", "batch", "variant", "train step s (median)", "compile s", "vs eager",
                         "max |out - eager| fake-quant", "FP32", "peak RSS GiB", "error"], rows)
    return "\n".join(lines + ["", _machine(d)]) + "\n"


def smoothquant_table(d: dict) -> str:
    """benchmarks.smoothquant: W8A8 static with and without SmoothQuant, onnxruntime and NNCF side by side."""
    fp, fl = d["fp32_top1"], d.get("fp32", {}).get("latency_ms")
    lines = [f"Model {d['model']} (fused), {d['calibration_images']} calibration images for every tool; top-1 and "
             f"logit SQNR vs FP32 on onnxruntime on {d['val_images']} val images; FP32 top-1 {_pct(fp)} %"
             + (f", {fl:.3f} ms" if fl else "") + ". Latency: median, batch 1, 2 threads, interleaved.", ""]
    rows = []
    for tool, r in d["rows"].items():
        if "error" in r:
            rows.append(_failed_row(tool, r, 5))
            continue
        rows.append([tool, _pct(r["top1"]), _pp(-r["drop_pp"]), f"{r['sqnr_db']:.2f}",
                     _pct(r["top1_agreement"]), _ms_vs(r.get("latency_ms"), fl),
                     f"{r['seconds']:.1f}"])
    lines += _table(["tool", "top-1", "− FP32 (pp)", "SQNR dB", "argmax = FP32 (%)", "latency ms (x FP32)",
                     "quantize s"], rows)
    lines += _peer_notes(d)
    return "\n".join(lines + ["", _machine(d)]) + "\n"


RENDER = {"suite": suite_table, "train": train_table, "qat": qat_table, "export": export_table,
          "search": search_table, "dynamic": dynamic_table, "calibration": calibration_table, "zoo": zoo_table,
          "lowbit": lowbit_table, "nbits": nbits_table,
          "accuracy_control": accuracy_control_table, "qat_zoo": qat_zoo_table, "smoothquant": smoothquant_table}


def write_table(kind: str, name: str, data: dict, results: Path = RESULTS) -> Path:
    """results/NAME.md: the table of benchmark `kind` for the payload `data` (what NAME.json holds)."""
    from qtool.io import atomic_write_text

    p = results / f"{name}.md"
    atomic_write_text(p, RENDER[kind](data))
    return p


# ------------------------------------------------------------------------------------------ RESULTS.md

def _search_cmd(d: dict, name: str) -> str:
    s = d["settings"]
    wd = "" if name == "search" else " --workdir DIR"
    low = (s.get("supernet") or {}).get("sandwich_low")
    first = (f"python -m benchmarks.search --workers {s['workers']} --pop {s['pop']} --gens {s['gens']} "
             f"--supernet-epochs {s['supernet']['epochs']}{f' --sandwich-low {low}' if low else ''} --stage search{wd}")
    opts = [f"--finetune-steps {s['finetune_steps']}", f"--compare-top {s['compare_top']}",
            f"--finetune-init {s.get('finetune_init', 'fp32')}", f"--finetune-seeds {s.get('finetune_seeds', 1)}"]
    if s.get("finetune_distill"):
        opts.append(f"--finetune-distill {s['finetune_distill']}")
    opts += [f"--device {s['finetune_device']}", f"--workers {s['workers_finetune']}"]
    return first + "\n" + f"python -m benchmarks.search --stage finetune{wd} " + " ".join(opts) + \
        ("" if name == "search" else f" --name {name}")


def _qat_cmd(d: dict, name: str) -> str:
    s = d["settings"]
    if s["quick"]:
        return "python -m benchmarks.qat --quick"
    opt = s["optimizer"].split()[0]
    extra = (f" --model {s['model']}" if s.get("model", "resnet20") != "resnet20" else "") \
        + (f" --rows {s['rows']}" if s.get("rows") else "") + (f" --optimizer {opt}" if opt != "sgd" else "") \
        + (f" --lr {s['lr']}" if isinstance(s["lr"], str) else f" --lr {s['lr']:g}" if s["lr"] != 0.01 else "") \
        + (f" --loss {s['loss']}" if s.get("loss", "auto") != "auto" else "")
    default = "qat" if not extra else f"qat_{s['model']}"
    return (f"python -m benchmarks.qat --epochs {s['epochs']} --train-limit {s['train_limit']}{extra}"
            + ("" if name == default else f" --name {name}"))


@dataclass(frozen=True)
class Section:
    kind: str
    title: str
    measures: str
    runs: tuple  # (result name, command or a function of (payload, name) giving it)


SECTIONS = (
    Section("suite", "PTQ suite: FP32 vs onnxruntime quantize_static vs qtool",
            "Latency (median, ORT CPU EP, 2 threads, every variant of a model interleaved in one process) and "
            "top-1 of the FP32 model, onnxruntime's own `quantize_static` and qtool's W8A8 PTQ, plus the committed "
            "QAT models; float fallbacks in ORT's optimized graph. Models other than ResNet-20 have random weights "
            "and are timed only.",
            (("suite", "python -m benchmarks run"), ("suite_quick", "python -m benchmarks run --quick"))),
    Section("zoo", "Model zoo: qtool's CLI vs onnxruntime's quantization tools",
            "12 architectures built from transformers configs (random weights, BatchNorm statistics re-estimated) "
            "and trained third-party ONNX files from PyPI wheels, each through `qtool fuse -> quantize -> eval "
            "--against -> bench` (exit codes) and onnxruntime's `quantize_static` with and without "
            "`quant_pre_process`: integer-kernel coverage, worst-output SQNR vs FP32 on held-out feeds, batch-1 "
            "latency, quantize wall time; text / audio models also with dynamic activations vs `quantize_dynamic`.",
            (("zoo", "python -m benchmarks zoo"),)),
    Section("qat_zoo", "QAT on the model zoo: distillation on unlabeled inputs",
            "W8A8 and W4A8 `qtool qat --loss distill` of the zoo's architectures on unlabeled npz feeds: worst-output "
            "SQNR vs FP32 on held-out samples before (PTQ) and after QAT, the run's fake-quant vs onnxruntime "
            "difference in quantization steps and argmax agreement, the fidelity gate and exit codes; and the "
            "wall time of a fake-quant QAT training step of ResNet-50 and ViT-S with the PyTorch options tried.",
            (("qat_zoo", "python -m benchmarks qat_zoo"),)),
    Section("calibration", "Calibration methods: qtool vs onnxruntime quantize_static",
            "Each calibration method (minmax, percentile, entropy, mse) of qtool and of onnxruntime's `quantize_static` "
            "on the trained ResNet-20 with the same calibration images: top-1 on onnxruntime and quantize wall time "
            "(the tools interleaved), and where qtool's time goes.",
            (("calibration", "python -m benchmarks.calibration"),)),
    Section("lowbit", "Low-bit PTQ: qtool AdaRound / bias correction vs AIMET",
            "W4A8 and W4A4 post-training quantization of the trained ResNet-20 (and W4A8 of the trained MobileNetV2 "
            "x0.5): qtool's mse calibration, learned "
            "rounding (`--algo adaround`, at W4A4 also `--algo brecq --tune-activations`) and bias correction against "
            "AIMET's QuantSim (min_max, tf_enhanced) and AdaRound with the same calibration images and iterations; at "
            "W4A4 also with the first and last layer at 8 bits (`--first-last-bits 8`, AIMET's same quantizers at 8 "
            "bits): top-1 on onnxruntime and wall time.",
            (("lowbit", "python -m benchmarks lowbit"),
             ("lowbit_mobilenetv2_050", "python -m benchmarks lowbit --model mobilenetv2_050_cifar10 --bits W4A8"))),
    Section("nbits", "Weight-only 4-bit MatMul (MatMulNBits) vs int8 and onnxruntime's 4-bit quantizer",
            "The zoo's BERT and ViT (random weights) as FP32, qtool W8A8 static and dynamic, qtool `--activations "
            "none` (MatMulNBits, RTN and GPTQ, symmetric and with zero points) and onnxruntime's "
            "`MatMulNBitsQuantizer` (its default, blocks of 32, its GPTQ): file size, batch-1 latency, SQNR vs FP32 "
            "on held-out samples, quantize wall time.",
            (("nbits", "python -m benchmarks nbits"),)),
    Section("accuracy_control", "Accuracy-aware PTQ: qtool --max-drop vs NNCF quantize_with_accuracy_control",
            "The trained ResNet-20, MobileNetV2 x0.5, small ViT and LeNet-5 within a 0.5 pp top-1 budget: qtool's per-unit float / int8 / w4a8 choice "
            "(`--bits w4a8 --max-drop 0.5`, also with `--confidence 0.9`, and `--bits w8a8`) against NNCF's `quantize_with_accuracy_control` "
            "(W8A8 with float fallback) and uniform W8A8 / W4A8, with the same calibration and control images: top-1 "
            "on onnxruntime on the control images and on held-out ones, latency, size, wall time; with `--search`, "
            "also the front of `qtool search --eval ptq` over the same choices, measured the same way and plotted.",
            (("accuracy_control", lambda d, name: "python -m benchmarks accuracy_control"
              + (" --quick" if d.get("quick") else "") + (" --search" if d.get("search") else "")),
             ("accuracy_control_mobilenetv2_050", lambda d, name: "python -m benchmarks accuracy_control --model "
              "mobilenetv2_050_cifar10" + (" --search" if d.get("search") else "")),
             ("accuracy_control_vit_cifar", lambda d, name: "python -m benchmarks accuracy_control --model "
              "vit_cifar_cifar10" + (" --search" if d.get("search") else "")),
             ("accuracy_control_lenet5", lambda d, name: "python -m benchmarks accuracy_control --model "
              "lenet5_cifar10" + (" --search" if d.get("search") else "")))),
    Section("smoothquant", "SmoothQuant on the small ViT: W8A8 static vs onnxruntime and NNCF",
            "W8A8 static PTQ of the ViT trained on CIFAR-10 (benchmarks/models/vit_cifar_cifar10.onnx) with and "
            "without `--smoothquant ALPHA`, against onnxruntime's `quantize_static` and NNCF's `quantize` with "
            "model_type=TRANSFORMER (its own SmoothQuant), the same calibration images: top-1 and logit SQNR vs "
            "FP32 on onnxruntime, latency, quantize wall time.",
            (("smoothquant", "python -m benchmarks smoothquant"),)),
    Section("train", "FP32 training of the CIFAR-10 models",
            "FP32 training of the zoo's ResNet-20, its MobileNetV2 x0.5 (`mobilenetv2_050`, CIFAR strides), LeNet-5 "
            "(`lenet5`, BN after each conv, 62k parameters) and its small ViT (`vit_cifar`: conv tokenizer, 4 pre-norm "
            "blocks, 0.58M parameters; AdamW, label smoothing) on the shared CIFAR-10 split (45k train / 5k val) and "
            "the accuracy of the ONNX export on onnxruntime; the models are benchmarks/models/*_cifar10.onnx, which "
            "the other benchmarks quantize. The ViT's wall time includes the hours its resumable run was paused.",
            (("train_resnet20", "python -m benchmarks.train_resnet20"),
             ("train_mobilenetv2_050", lambda d, name: f"python -m benchmarks.train_resnet20 --model mobilenetv2_050 "
              f"--epochs {d['epochs']}"),
             ("train_vit_cifar", lambda d, name: f"python -m benchmarks.train_resnet20 --model vit_cifar "
              f"--epochs {d['epochs']}"),
             ("train_lenet5", lambda d, name: f"python -m benchmarks.train_resnet20 --model lenet5 "
              f"--epochs {d['epochs']}"))),
    Section("qat", "QAT: fidelity to onnxruntime and accuracy",
            "QAT of ResNet-20 at W8A8 (LSQ) and W4A4 (LSQ, PACT, DoReFa; first and last layer 8-bit): the fake-quant "
            "model's accuracy vs the exported QDQ model's on onnxruntime, argmax agreement, the largest logit "
            "difference in quantization steps, and the drop from FP32. The first run is the accuracy run (before the "
            "eval-mode emulation of ORT's integer kernels, `qtool.ortexact`); the second repeats a short run with it. "
            "The third is the small ViT: PTQ vs LSQ QAT started at the PTQ plan, at W8A8 and W4A8.",
            (("qat", _qat_cmd), ("qat_fidelity", _qat_cmd), ("qat_vit_cifar", _qat_cmd))),
    Section("export", "Export formats",
            "One W8A8 PTQ plan of ResNet-20 exported as QDQ, QOperator and integer-only: top-1 on onnxruntime, "
            "integer kernels vs float fallbacks, size; the same for short QAT plans; `qtool.intsim` against "
            "onnxruntime; packed INT4 weights vs int8 containers.",
            (("export", "python -m benchmarks.export"),)),
    Section("search", "Mixed-precision search: NSGA-III + supernet",
            "NSGA-III over per-layer W/A bit-widths {2, 4, 8} of ResNet-20 scored by a sandwich supernet: wall time, "
            "hypervolume against random search with as many evaluations on the same supernet, and the same QAT "
            "fine-tune for uniform W8A8 / W4A4 and the cheaper front members picked against each (does one "
            "dominate?). The second run trains the sandwich's small end at 4 bits.",
            (("search", _search_cmd), ("search_low4", _search_cmd))),
    Section("dynamic", "Dynamic (per-image) bit-widths: DQNet vs static QAT",
            "A bit controller routes each image to a per-layer bit configuration (DQNet-style); the deployment runs "
            "on onnxruntime. Accuracy vs static QAT at the same average BitFLOPs (trained with the same budget), "
            "ORT vs PyTorch, and routing latency. `--quick` is a smoke run, not a result.",
            (("dynamic", "python -m benchmarks.dynamic"), ("dynamic_quick", "python -m benchmarks.dynamic --quick"))),
)


def load(name: str, results: Path = RESULTS) -> dict:
    return json.loads((results / f"{name}.json").read_text())


def results_markdown(results: Path = RESULTS) -> str:
    """RESULTS.md: one section per benchmark (what it measures, how to rerun it, its tables)."""
    out = ["# Benchmark results", "",
           "Generated by `python -m benchmarks results` from the JSON files in `benchmarks/results/` "
           "(do not edit by hand: rerun a benchmark, then that command). ResNet-20 numbers are on the shared "
           "CIFAR-10 split, top-1 in % on the 5,000-image validation slice unless a table says otherwise. "
           "Results of one-off experiments (calibration choices, cascades, learning rates, GPU numerics) are in "
           "[docs/FINDINGS.md](../docs/FINDINGS.md).", ""]
    out += [f"- [{s.title}](#{_anchor(s.title)})" for s in SECTIONS] + [""]
    for s in SECTIONS:
        out += [f"## {s.title}", "", s.measures, ""]
        for name, cmd in s.runs:
            path = results / f"{name}.json"
            if not path.exists():
                out += [f"`results/{name}.json` is absent: not run here.", ""]
                continue
            d = load(name, results)
            command = cmd(d, name) if callable(cmd) else cmd
            out += [f"### `results/{name}.json`", "", "```", command, "```", "", RENDER[s.kind](d).rstrip("\n"), ""]
    return "\n".join(out).rstrip("\n") + "\n"


README = ROOT.parent / "README.md"
HEADLINE_BEGIN = "<!-- headline: generated by `python -m benchmarks results` from benchmarks/results/suite.json -->"
HEADLINE_END = "<!-- /headline -->"


def headline_markdown(results: Path = RESULTS) -> str:
    """The README's one table: ResNet-20 (trained here) FP32 vs onnxruntime quantize_static vs qtool."""
    d = load("suite", results)
    r = d["models"]["resnet20"]
    top1 = r.get("top1") or {}
    rows = []
    for key, lat in sorted(r["latency"].items(), key=lambda kv: int(kv[0].removeprefix("batch"))):
        ms = {k: lat[k]["median_ms"] for k in ("fp32", "ort_int8", "qtool_int8")}
        rows.append([key.removeprefix("batch"), f"{ms['fp32']:.3f}", f"{ms['ort_int8']:.3f}", f"{ms['qtool_int8']:.3f}",
                     f"{ms['qtool_int8'] / ms['fp32']:.2f}"])
    acc = " / ".join(_pct(top1.get(k)) for k in ("fp32", "ort_int8", "qtool_int8"))
    return "\n".join(_table(["ResNet-20 (CIFAR-10), batch", "FP32 ms", "ORT quantize_static ms", "qtool W8A8 ms",
                              "qtool / FP32"], rows)
                     + ["", f"Top-1 on the 5k val slice, FP32 / quantize_static / qtool: {acc} %. {_machine(d)}"])


def update_readme(readme: Path = README, results: Path = RESULTS) -> str:
    """README.md with the text between the headline markers regenerated."""
    text = readme.read_text()
    if HEADLINE_BEGIN not in text or HEADLINE_END not in text:
        raise ValueError(f"{readme} has no headline markers")
    head, rest = text.split(HEADLINE_BEGIN, 1)
    _, tail = rest.split(HEADLINE_END, 1)
    return f"{head}{HEADLINE_BEGIN}\n{headline_markdown(results)}\n{HEADLINE_END}{tail}"


def _anchor(title: str) -> str:
    keep = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return keep.replace(" ", "-")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks results", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON results [benchmarks/results]")
    ap.add_argument("-o", "--out", type=Path, default=RESULTS_MD, help="output [benchmarks/RESULTS.md]")
    ap.add_argument("--tables", action="store_true", help="also rewrite NAME.md next to each JSON")
    a = ap.parse_args(argv)
    from qtool.io import atomic_write_text

    if not a.results.is_dir():
        print(f"{a.results}: no such folder", file=sys.stderr)
        return 2
    if a.tables:
        for s in SECTIONS:
            for name, _ in s.runs:
                if (a.results / f"{name}.json").exists():
                    write_table(s.kind, name, load(name, a.results), a.results)
    atomic_write_text(a.out, results_markdown(a.results))
    print(f"wrote {a.out}", file=sys.stderr)
    if a.out == RESULTS_MD and a.results == RESULTS:  # the README's headline follows the committed results
        atomic_write_text(README, update_readme())
        print(f"wrote the headline table of {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
