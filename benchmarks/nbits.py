"""Weight-only 4-bit MatMul (MatMulNBits) side by side with int8 and onnxruntime's own 4-bit quantizer.

    python -m benchmarks nbits [--quick] [--models bert,vit] [--runs N]   # results/nbits[_quick].{json,md}

Models: the zoo's BERT (4 layers, hidden 256) and ViT (4 layers, hidden 192, 128x128 images) built in code
from transformers config objects (benchmarks.zoo_models; random weights, so the SQNR columns measure how
closely each quantized model tracks its own FP32 model, not task accuracy; trained weights, with outliers
and correlated features, may rank the variants differently). Calibration and held-out test feeds are
disjoint (random token ids with padded attention masks / CIFAR-10 images where the shared copy exists).

Variants, each on the same FP32 model, in one process:

- qtool W8A8 static (`QuantConfig()`, the `qtool quantize` default) and `--activations dynamic`;
- qtool weight-only MatMulNBits (`--activations none`): RTN with MSE block scales, and `--algo gptq`
  (Hessians of the calibration feeds), both with zero points (qtool's default) and symmetric, blocks of 32;
- onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer: as constructed with no options
  (its default: blocks of 128, asymmetric, its C++ RTN), at blocks of 32 (qtool's block size), and with its
  GPTQWeightOnlyQuantConfig (its numpy GPTQ from onnxruntime.quantization.neural_compressor, group 32, on
  the same calibration feeds; its output lacks the com.microsoft opset import, added here as a user must).
  A variant that fails is recorded with its message.

Measured: file size; latency (qtool.latency.bench over all variants of a model in one call: medians of
`--runs` runs, batch 1, 2 intra-op threads, random feeds); SQNR of the output vs FP32 on the held-out
samples (qtool.evaluation, what `qtool eval --against` runs); quantize wall time; the MatMul-type nodes
left in float.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from benchmarks.common import RESULTS, write_result

MODELS = ("bert", "vit")
CAL_BATCH = 16


def _batches(feeds: dict[str, np.ndarray], size: int = CAL_BATCH) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(feeds.values())))
    return [{k: v[i:i + size] for k, v in feeds.items()} for i in range(0, n, size)]


def _qtool(config_kw: dict):
    def run(fp32: onnx.ModelProto, cal: list[dict]) -> onnx.ModelProto:
        import qtool

        cfg = qtool.QuantConfig(**config_kw)
        data = cal if cfg.activations == "static" or cfg.algo == "gptq" else None
        return qtool.quantize(fp32, data, cfg).model
    return run


def _ort(block_size: int | None = None, gptq: bool = False):
    def run(fp32: onnx.ModelProto, cal: list[dict]) -> onnx.ModelProto:
        from onnxruntime.quantization.calibrate import CalibrationDataReader
        from onnxruntime.quantization.matmul_nbits_quantizer import GPTQWeightOnlyQuantConfig, MatMulNBitsQuantizer

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(cal)

            def get_next(self):
                return next(self.it, None)

        kw = {} if block_size is None else {"block_size": block_size}
        if gptq:
            kw["algo_config"] = GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader())
        m = onnx.ModelProto()
        m.CopyFrom(fp32)
        q = MatMulNBitsQuantizer(m, **kw)
        q.process()
        out = q.model.model
        # Its RTN / GPTQ path (onnxruntime.quantization.neural_compressor) writes com.microsoft MatMulNBits
        # without importing that domain, which onnx.checker (and qtool's loader) refuse; a user adds it.
        if not any(o.domain == "com.microsoft" for o in out.opset_import):
            out.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        return out
    return run


VARIANTS = {  # name -> (label, quantizer)
    "qtool_w8a8": ("qtool W8A8 static (default)", _qtool({})),
    "qtool_dynamic": ("qtool --activations dynamic", _qtool({"activations": "dynamic"})),
    "qtool_rtn": ("qtool MatMulNBits RTN (zero points, b32; default)", _qtool({"activations": "none"})),
    "qtool_gptq": ("qtool MatMulNBits GPTQ (zero points, b32)", _qtool({"activations": "none", "algo": "gptq"})),
    "qtool_rtn_sym": ("qtool MatMulNBits RTN (symmetric, b32)",
                      _qtool({"activations": "none", "weight_symmetric": True})),
    "qtool_gptq_sym": ("qtool MatMulNBits GPTQ (symmetric, b32)",
                       _qtool({"activations": "none", "algo": "gptq", "weight_symmetric": True})),
    "ort_default": ("ORT MatMulNBitsQuantizer default (asym, b128)", _ort()),
    "ort_b32": ("ORT MatMulNBitsQuantizer (asym, b32)", _ort(32)),
    "ort_gptq": ("ORT MatMulNBitsQuantizer GPTQ (asym, g32)", _ort(32, gptq=True)),
}


def _float_matmuls(m: onnx.ModelProto) -> dict[str, int]:
    ops: dict[str, int] = {}
    for n in m.graph.node:
        if n.op_type in ("MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul",
                         "QLinearMatMul", "Conv"):
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def _line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def run_model(key: str, workdir: Path, n_cal: int, n_test: int, runs: int, variants: list[str]) -> dict:
    from benchmarks import zoo_models
    from benchmarks.zoo import sqnr
    from qtool.latency import BenchConfig, bench

    fp32, cal, test, src, _ = zoo_models.build(key, n_cal, n_test)
    workdir.mkdir(parents=True, exist_ok=True)
    test_npz = workdir / "test.npz"
    np.savez(test_npz, **test)
    paths = {"fp32": workdir / "fp32.onnx"}
    onnx.save(fp32, paths["fp32"])
    rows: dict[str, dict] = {"fp32": {"label": "FP32", "ops": _float_matmuls(fp32)}}
    for v in variants:
        label, quantize = VARIANTS[v]
        print(f"[nbits] {key}: {v} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            q = quantize(fp32, _batches(cal))
            paths[v] = workdir / f"{v}.onnx"
            onnx.save(q, paths[v])
            rows[v] = {"label": label, "quantize_s": time.perf_counter() - t, "ops": _float_matmuls(q)}
            rows[v]["sqnr"] = sqnr(paths[v], fp32, test_npz)
        except Exception as e:  # recorded, not fatal: the table says which tool failed and why
            rows[v] = {"label": label, "error": _line(e), "quantize_s": time.perf_counter() - t}
            paths.pop(v, None)
    for v, p in paths.items():
        rows[v]["size_bytes"] = p.stat().st_size
    rep = bench([str(p) for p in paths.values()], BenchConfig(batches=(1,), threads=2, warmup=5, runs=runs,
                                                                min_time_s=0.5, progress=False))
    by_path = {r.model: r for r in rep.rows}
    for v, p in paths.items():
        r = by_path.get(str(p))
        if r is not None and r.ok:
            rows[v]["latency_ms"] = r.median_ms
            rows[v]["latency_ratio"] = r.median_ms / by_path[str(paths["fp32"])].median_ms
        elif r is not None:
            rows[v]["latency_error"] = r.status
    return {"data": src, "calibration_samples": n_cal, "test_samples": n_test, "variants": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks nbits", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 calibration / 16 test samples, 10 timed runs (a smoke run)")
    ap.add_argument("--models", default=",".join(MODELS), help="subset of bert,vit, comma-separated")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="subset, comma-separated")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per model (default 50; quick 10)")
    ap.add_argument("--workdir", default=None, help="keep the models here (default: a temporary folder)")
    args = ap.parse_args(argv)
    import onnxruntime

    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    bad = sorted(set(models) - set(MODELS)) + sorted(set(variants) - set(VARIANTS))
    if bad:
        print(f"unknown models / variants: {', '.join(bad)}", file=sys.stderr)
        return 2
    n_cal, n_test, runs = (16, 16, 10) if args.quick else (128, 64, 50)
    runs = args.runs or runs
    t0 = time.perf_counter()
    out: dict = {"models": {}}
    with tempfile.TemporaryDirectory(prefix="qtool-nbits-") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        for key in models:
            out["models"][key] = run_model(key, root / key, n_cal, n_test, runs, variants)
    out["settings"] = {"quick": args.quick, "threads": 2, "batch": 1, "runs": runs,
                       "onnxruntime": onnxruntime.__version__, "calibration_samples": n_cal,
                       "test_samples": n_test, "block_size": 32, "wall_s": time.perf_counter() - t0}
    name = "nbits_quick" if args.quick else "nbits"
    p = write_result(name, out, table="nbits")
    print((RESULTS / f"{name}.md").read_text())
    print(f"wrote {p} in {out['settings']['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
