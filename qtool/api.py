"""The Python API: one call per stage (docs/DESIGN.md, "layers"). `import qtool` exposes these names.

    import qtool
    fp32 = qtool.train(qtool.TrainConfig(model="lenet5", data="digits", epochs=2), "lenet5.onnx").model
    fused = qtool.fuse(fp32).model
    q = qtool.quantize(fused, "digits", qtool.QuantConfig(calib="mse"))
    t = qtool.qat(fused, "digits", qtool.QATConfig(weight_bits=4, act_bits=4))
    x = qtool.export(t.fused, t.plan, qtool.ExportConfig(format="integer"))

Every call takes an `onnx.ModelProto` or a path, data as a SPEC string (`"digits"`, `"cifar10:DIR"`,
...), a `qtool.Data` (SPEC + normalization) or ready data sets / feeds, and a frozen config; it returns
a result object (`.model`, `.plan`, ..., and `.save(path)` where there is a model to write). Nothing
here parses command-line strings: `qtool.cli` does that and calls these functions.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from qtool.accuracy_control import ControlReport, accuracy_control, control_data
from qtool.control_config import control_enabled
from qtool.data import Data, ImageDataset, load_dataset
from qtool.errorreport import ErrorReport, check_not_collapsed, error_report
from qtool.errors import QtoolError
from qtool.evaluation import EvalConfig, EvalResult, evaluate_model
from qtool.exporting import ExportConfig, ExportResult, export_model
from qtool.feeds import FeedSet, calibration_feeds, resolve_data
from qtool.fusion import FuseConfig, FuseSummary, check_finite_weights, is_fused
from qtool.io import check_model, load_model, save_model
from qtool.latency import BenchConfig, BenchReport
from qtool.lazy import lazy_getattr
from qtool.plan import QuantPlan, TensorQuant
from qtool.ptq import QuantConfig, QuantizeSummary
from qtool.qat_config import QATConfig

__all__ = ["train", "fuse", "quantize", "qat", "export", "evaluate", "bench", "search", "dynamic",
           "TrainConfig", "FuseConfig", "QuantConfig", "QATConfig", "ExportConfig", "EvalConfig", "BenchConfig",
           "SearchConfig", "DynamicConfig", "Data", "QuantPlan", "TensorQuant", "QtoolError", "FuseResult",
           "QuantizeResult", "load_model", "save_model", "load_dataset"]

ModelLike = onnx.ModelProto | str | os.PathLike
REPORT_SAMPLES = 256  # calibration samples the per-tensor error report (`--report`) runs on
# ... and the collapse check with the printed vs-FP32 line otherwise: a collapse shows on a few batches,
# and running the quantized model on every calibration sample would be most of quantize's time.
CHECK_SAMPLES = 16
DataLike = str | Data | tuple[ImageDataset, ImageDataset]


# Configs of the torch stages load on first use (PEP 562), so that quantize / export / eval / bench
# never import torch: about 3 s of every CLI call.
_LAZY = {"SearchConfig": "qtool.bitsearch.config", "DynamicConfig": "qtool.dynbits.train",
         "DynamicResult": "qtool.dynbits.train", "TrainConfig": "qtool.training", "TrainResult": "qtool.training"}
__getattr__ = lazy_getattr(__name__, _LAZY, globals())


def _model(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    raise QtoolError(f"model must be an onnx.ModelProto or a path, got {type(model).__name__}")


def _config(config, cls):
    if not isinstance(config, cls):
        raise QtoolError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    return config


def _splits(model: onnx.ModelProto, data: DataLike | None) -> tuple[ImageDataset, ImageDataset, Data | None]:
    """(train, val, data) from a SPEC / Data, or a (train, val) pair of data sets."""
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, ImageDataset) for d in data):
        return data[0], data[1], None
    d = resolve_data(model, data)
    return load_dataset(d.spec, "train"), load_dataset(d.spec, "val"), d


# -- train -------------------------------------------------------------------------------------------

def train(config: TrainConfig, output: str | os.PathLike, *, quiet: bool = False) -> TrainResult:
    """FP32 training of a zoo model; writes `output` (ONNX, preprocessing in its metadata) and a .pt
    checkpoint beside it (the checkpoint is what a resumed or re-exported run needs)."""
    from qtool.training import TrainConfig, train as run

    return run(_config(config, TrainConfig), output, quiet=quiet)


# -- fuse --------------------------------------------------------------------------------------------

@dataclass
class FuseResult:
    model: onnx.ModelProto
    summary: FuseSummary

    def save(self, path: str | os.PathLike) -> None:
        save_model(self.model, path)


def fuse(model: ModelLike, config: FuseConfig = FuseConfig()) -> FuseResult:
    """Simplify (onnxsim), fold BN and constant Mul/Add into Conv/Gemm/MatMul, record quantization units."""
    from qtool.fusion import fuse as run

    m = _model(model)
    check_finite_weights(m)
    fused, summary = run(m, use_onnxsim=_config(config, FuseConfig).use_onnxsim)
    check_model(fused, "fused")
    return FuseResult(fused, summary)


# -- quantize ----------------------------------------------------------------------------------------

@dataclass
class QuantizeResult:
    model: onnx.ModelProto  # QDQ, or QOperator with config.format == "qoperator"
    plan: QuantPlan
    fused: onnx.ModelProto  # the fused float graph the plan names (rescaled / refined weights with equalize,
    # smoothquant, algo / bias_correction)
    summary: QuantizeSummary
    report: ErrorReport  # per-tensor SQNR vs FP32 on calibration samples, worst first
    control: ControlReport | None = None  # config.max_drop / min_sqnr_db: the per-unit choices and why


    def save(self, path: str | os.PathLike, plan_path: str | os.PathLike | None = None) -> None:
        save_model(self.model, path)
        if plan_path is not None:
            self.plan.save(plan_path)

    def lines(self) -> list[str]:
        return (self.summary.lines() + list(self.plan.meta.get("rescale", {}).get("lines", []))
                + list(self.plan.meta.get("refine", {}).get("lines", []))
                + (self.control.lines() if self.control is not None else []))


def quantize(model: ModelLike, data: str | Data | Iterable[dict[str, np.ndarray]] | None = None,
             config: QuantConfig = QuantConfig(), *, val_data: str | Data | FeedSet | None = None,
             progress: bool = True) -> QuantizeResult:
    """Post-training quantization: calibrate on `data` (a SPEC / Data: `config.calib_size` images of its
    train split; or any iterable of `{input_name: array}` feeds) and insert Q/DQ from the plan.

    With `QuantConfig(activations="dynamic")` nothing is calibrated and `data` may be None; given, it
    feeds the error report and the collapse check. So with `activations="none"` (weight-only 4-bit
    MatMulNBits, qtool.nbits), except that `algo="gptq"` learns its rounding from `data`.

    With a budget (`QuantConfig(max_drop=...)` or `min_sqnr_db=...`) each quantization unit gets the
    cheapest choice of `config.target` that keeps the model within it, measured on onnxruntime on
    evaluation samples disjoint from the calibration ones (`val_data`, else the data's val split or the
    samples after the calibration ones: `qtool.accuracy_control`); `.control` says what was chosen and why."""
    from qtool.fusion import fuse as run_fuse
    from qtool.fusion import op_counts
    from exporters.qdq import apply_plan
    from qtool.ptq import quantize_dynamic, quantize_plan

    config = _config(config, QuantConfig)
    m = _model(model)
    check_finite_weights(m)
    fsum = None
    if not is_fused(m):
        # onnxsim turns a 3-D MatMul + Add into Reshape -> Gemm -> Reshape: right for static QGemm, but
        # for dynamic products it adds 27 Reshapes to BERT-small and blocks half of onnxruntime's
        # SkipLayerNormalization fusions.
        m, fsum = run_fuse(m, use_onnxsim=config.activations == "static")
    if config.activations in ("dynamic", "none"):
        if config.activations == "none":
            from qtool.nbits import quantize_nbits

            calib = None
            if config.algo == "gptq":
                if data is None:
                    raise QtoolError("algo='gptq' learns the rounding from calibration data: give data")
                # a list: read again by the error report
                calib = list(calibration_feeds(m, data, config.calib_size) if isinstance(data, (str, Data)) else data)
            qdq, plan = quantize_nbits(m, config, calib)
        else:
            qdq, plan = quantize_dynamic(m, config)
        report = ErrorReport([], {}, 0)
        if data is not None:
            feeds = calibration_feeds(m, data, min(config.calib_size, _report_samples(config))) \
                if isinstance(data, (str, Data)) else (calib if config.activations == "none" and calib else data)
            report = error_report(m, qdq, plan, _head(feeds, _report_samples(config)), per_tensor=False)
            if config.check_collapse:
                check_not_collapsed(report)
        counts = plan.summary_counts()
        if config.activations == "none":  # the plan's tensors are per-tensor / per-channel; these are blocks
            counts = {f"weight:{'s' if config.weight_symmetric else 'u'}{config.weight_bits}:"
                      f"block{config.block_size}": len(plan.meta["weight_only"])}
        summary = QuantizeSummary(config, counts, op_counts(m), op_counts(qdq), fsum)
        return QuantizeResult(qdq, plan, m, summary, report)
    if control_enabled(config):
        calib, eval_set = control_data(m, data, val_data, config)
        calib = list(calib)
        tuned, plan, control = accuracy_control(m, calib, eval_set, config, show_progress=progress)
        qdq = apply_plan(tuned, plan)
        report = error_report(tuned, qdq, plan, _head(calib, _report_samples(config)),
                              per_tensor=config.per_tensor_report)
        if config.check_collapse:
            check_not_collapsed(report)
        qmodel = qdq if config.format == "qdq" else export_model(tuned, plan, ExportConfig(format=config.format)).model
        summary = QuantizeSummary(config, plan.summary_counts(), op_counts(m), op_counts(qmodel), fsum)
        return QuantizeResult(qmodel, plan, tuned, summary, report, control)
    if val_data is not None:
        raise QtoolError("val_data is the accuracy control's evaluation data: give max_drop or min_sqnr_db too")
    if data is None or isinstance(data, (str, Data)):
        feeds = calibration_feeds(m, data, config.calib_size)
    else:
        feeds = data
    # The error report runs on the first calibration batches (up to _report_samples), with the
    # FP32 outputs calibration computed for them as its reference (against the FP32 weights, before any
    # refinement).
    report_feeds, reference = [], []

    def keep(feed, outputs):
        if sum(len(next(iter(f.values()))) for f in report_feeds) < _report_samples(config):
            report_feeds.append(feed)
            reference.append(outputs)

    rescaled: list[onnx.ModelProto] = []  # with equalize / smoothquant: m with channels moved, the same outputs
    tuned, plan = quantize_plan(m, feeds, config, on_outputs=keep, on_rescaled=rescaled.append)  # tuned: refined
    ref = rescaled[0] if rescaled else m  # the per-tensor rows compare tensors of the graph the plan calibrated
    qdq = apply_plan(tuned, plan)
    report = error_report(ref, qdq, plan, report_feeds, per_tensor=config.per_tensor_report, reference=reference)
    if config.check_collapse:
        if report.collapsed() and not report.tensors:  # name the worst tensor in the error
            report = error_report(ref, qdq, plan, report_feeds, per_tensor=True)
        check_not_collapsed(report)
    qmodel = qdq
    if config.format != "qdq":  # the same plan, lowered by the exporter (QLinearConv / QGemm / ...)
        qmodel = export_model(tuned, plan, ExportConfig(format=config.format)).model
    summary = QuantizeSummary(config, plan.summary_counts(), op_counts(m), op_counts(qmodel), fsum)
    return QuantizeResult(qmodel, plan, tuned, summary, report)


def _report_samples(config: QuantConfig) -> int:
    return REPORT_SAMPLES if config.per_tensor_report else CHECK_SAMPLES


def _head(batches: Iterable[dict[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
    """The first batches of `batches` holding `n` samples or more in all."""
    out: list[dict[str, np.ndarray]] = []
    for b in batches:
        if sum(len(next(iter(f.values()))) for f in out) >= n:
            break
        out.append(b)
    return out


# -- qat ---------------------------------------------------------------------------------------------

def qat(model: ModelLike, data: DataLike | None = None, config: QATConfig = QATConfig()):
    """Quantization-aware training on the graph lifted to PyTorch; returns a QATResult (.model QDQ,
    .plan, .fused tuned float graph, .fidelity fake-quant vs onnxruntime). `data`: a SPEC / Data, or a
    (train, val) pair of ImageDatasets or FeedSets. Labels or not: `QATConfig.loss` (ce | distill | auto)."""
    from qtool.preprocess import resolve_preprocess
    from qtool.qat_train import qat as run

    from qtool.feeds import FeedSet, training_feeds

    config = _config(config, QATConfig)
    m = _model(model)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, FeedSet) for d in data):
        return run(m, data[0], data[1], config)
    # Data that is not an image data set (an npz of named inputs, an images: folder) trains as feeds:
    # any inputs, labels optional (loss distill), preprocessed (--mean/--std) when read.
    feeds = training_feeds(m, data) if not isinstance(data, tuple) else None
    if feeds is not None:
        return run(m, feeds[0], feeds[1], config)
    train_ds, val_ds, d = _splits(m, data)
    pre = resolve_preprocess(m, d.mean, d.std) if d is not None and (d.mean or d.std) else None
    return run(m, train_ds, val_ds, config, preprocess=pre)


# -- export ------------------------------------------------------------------------------------------

def export(model: ModelLike, plan: QuantPlan | str | os.PathLike, config: ExportConfig = ExportConfig()) -> ExportResult:
    """A fused graph + its QuantPlan as a deployable integer model (QDQ, QOperator or integer-only)."""
    if not isinstance(plan, QuantPlan):
        plan = QuantPlan.load(plan)
    return export_model(_model(model), plan, _config(config, ExportConfig))


# -- evaluate / bench --------------------------------------------------------------------------------

def evaluate(model: ModelLike, data: str | Data | None = None, config: EvalConfig = EvalConfig(), *,
             against: ModelLike | None = None) -> EvalResult:
    """On onnxruntime on a split of `data`: top-1 where there are labels and class scores; with `against`
    (the FP32 model), per output SQNR / cosine / max abs error / top-1 agreement, labels or not."""
    m = _model(model)
    ref = _model(against) if against is not None else None
    return evaluate_model(m, resolve_data(m, data), _config(config, EvalConfig), against=ref)


def bench(models: Sequence[str | os.PathLike], config: BenchConfig = BenchConfig()) -> BenchReport:
    """Latency (median / p90 / p99), throughput and ratio vs the first model on onnxruntime EPs."""
    from qtool.latency import bench as run

    return run(models, _config(config, BenchConfig))


# -- search / dynamic --------------------------------------------------------------------------------

def search(model: ModelLike, data: str | Data | None = None, config: SearchConfig | None = None, *,
           workdir: str | os.PathLike, progress: bool = True):
    """NSGA-III search over per-layer bit-widths; returns a SearchResult (front, baselines) and writes
    the log, checkpoints, front.json/csv and plots under `workdir` (`config.resume` continues one)."""
    from qtool.bitsearch.config import SearchConfig
    from qtool.bitsearch.runner import run_search

    m = _model(model)
    config = SearchConfig() if config is None else _config(config, SearchConfig)
    return run_search(m, resolve_data(m, data).spec, config, Path(workdir), progress=progress)


def dynamic(model: ModelLike, data: DataLike | None = None, config: DynamicConfig | None = None, *,
            output_dir: str | os.PathLike) -> DynamicResult:
    """Per-image bit-widths (DQNet): a bit controller + routed QDQ models, deployed under `output_dir`."""
    from qtool.dynbits.train import DynamicConfig, dynamic as run

    config = DynamicConfig() if config is None else _config(config, DynamicConfig)
    o = Path(output_dir)
    if o.exists() and not o.is_dir():
        raise QtoolError(f"output path exists and is not a directory: {o}")
    if not (o.parent if str(o.parent) else Path(".")).is_dir():
        raise QtoolError(f"parent directory of {o} does not exist")
    m = _model(model)
    train_ds, val_ds, _ = _splits(m, data)
    return run(m, train_ds, val_ds, config, o)
