"""`qtool export`: fused graph + QuantPlan -> deployable integer ONNX file.

    result = export_model(fused, plan, ExportConfig(format="integer"))   # ExportResult(model, report)
    result.save("model.int8.onnx")

Formats (exporters/):
- "qdq": QuantizeLinear/DequantizeLinear around float ops (exporters.qdq.apply_plan); onnxruntime
  fuses them into integer kernels. Weights of <= 4 bits optionally packed as INT4 (`int4`).
- "qoperator": QLinearConv / QLinearMatMul / QGemm / QLinearAdd / QLinearGlobalAveragePool.
- "integer": integer-only standard ONNX (ConvInteger / MatMulInteger, int32 bias, fixed-point
  requantization with Mul / BitShift); qtool.intsim executes it in NumPy bit for bit.

Every export passes onnx.checker.check_model(full_check=True) and is loaded by onnxruntime on the
CPU EP (qtool.ortgraph counts the integer kernels it runs); the report gives the file size, those
counts, the format and notes (fallbacks are never silent).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import onnx

from qtool.errors import QtoolError
from qtool.io import check_model, default_opset, save_model
from qtool.plan import QuantPlan

log = logging.getLogger(__name__)

FORMATS = ("qdq", "qoperator", "integer")


@dataclass(frozen=True)
class ExportConfig:
    format: str = "qdq"  # qdq | qoperator | integer
    int4: str = "auto"  # qdq only: pack weights of <= 4 bits as INT4 (auto: only if ORT keeps integer kernels)
    requant: str = "fixedpoint"  # integer only: fixed-point multiplier + shift, or pot (shift only)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # where the integer kernels are counted

    def __post_init__(self):
        from exporters.qdq import INT4_MODES

        if self.format not in FORMATS:
            raise QtoolError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.int4 not in INT4_MODES:
            raise QtoolError(f"int4 must be one of {', '.join(INT4_MODES)}, got {self.int4!r}")
        if self.requant not in ("fixedpoint", "pot"):
            raise QtoolError(f"requant must be fixedpoint or pot, got {self.requant!r}")


@dataclass
class ExportReport:
    format: str
    size_bytes: int
    opset: int
    ops: dict[str, int]
    integer_compute: int  # compute nodes ORT runs as integer kernels (qtool.ortgraph)
    float_compute: int
    float_fallbacks: int  # float compute nodes still fed by a DequantizeLinear (unfused QDQ groups)
    integer_ops: dict[str, int] = field(default_factory=dict)
    int4_weights: int = 0  # weights written as packed INT4/UINT4
    notes: list[str] = field(default_factory=list)
    output: str | None = None

    def lines(self) -> list[str]:
        out = [f"{'wrote ' + self.output + ': ' if self.output else ''}{self.format} model, "
               f"{self.size_bytes} bytes, opset {self.opset}, {sum(self.ops.values())} nodes",
               f"onnxruntime CPU: {self.integer_compute} integer compute kernels "
               f"({', '.join(f'{k} x{v}' for k, v in self.integer_ops.items()) or 'none'}), "
               f"{self.float_compute} float compute, {self.float_fallbacks} float fallbacks"]
        if self.int4_weights:
            out.append(f"{self.int4_weights} weights packed as 4-bit")
        return out + [f"note: {n}" for n in self.notes]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ExportResult:
    model: onnx.ModelProto
    report: ExportReport

    def save(self, path: str | os.PathLike) -> None:
        save_model(self.model, path)
        self.report.output = str(path)
        self.report.size_bytes = os.path.getsize(path)


def _check_plan(model: onnx.ModelProto, plan: QuantPlan) -> None:
    if not isinstance(plan, QuantPlan):
        raise QtoolError(f"plan must be a QuantPlan, got {type(plan).__name__}")
    if not plan.tensors:
        raise QtoolError("plan quantizes no tensor")
    try:
        plan.validate(model)
    except QtoolError as e:
        raise QtoolError(f"{e} (plans name tensors of the fused graph: fuse the model the plan was made for)") from None
    if not plan.calibrated:
        missing = [k for k, t in plan.tensors.items() if not t.calibrated][:5]
        raise QtoolError(f"plan has tensors without scale/zero_point (calibrate first): {missing}")


def _export_qdq(model: onnx.ModelProto, plan: QuantPlan, int4: str, providers) -> tuple[onnx.ModelProto, list[str], int]:
    from exporters.qdq import pack_int4_weights
    from qtool.ortgraph import integer_kernel_report
    from exporters.qdq import apply_plan

    q = apply_plan(model, plan)
    notes = []
    narrow = sorted({t.bits for t in plan.tensors.values() if t.kind == "weight" and t.bits < 8})
    w4 = [k for k, t in plan.tensors.items() if t.kind == "weight" and t.bits <= 4]
    if narrow:
        notes.append(f"{sum(t.kind == 'weight' and t.bits < 8 for t in plan.tensors.values())} weights of "
                     f"{'/'.join(map(str, narrow))} bits stored as int8 codes in their narrowed range")
    if int4 == "off" or not w4:
        if int4 == "on" and not w4:
            notes.append("--int4-weights on: no weight of <= 4 bits in the plan; nothing packed")
        return q, notes, 0
    packed, names = pack_int4_weights(q, plan)
    check_model(packed, "exported int4 QDQ")
    r8 = integer_kernel_report(q, providers)
    r4 = integer_kernel_report(packed, providers)
    lost = r8.integer_compute - r4.integer_compute
    if lost > 0 or r4.float_fallbacks > r8.float_fallbacks:
        msg = (f"packed int4 weights: onnxruntime on {', '.join(providers)} runs {r4.integer_compute} integer "
               f"kernels ({r4.float_fallbacks} float fallbacks) vs {r8.integer_compute} ({r8.float_fallbacks}) "
               f"with int8 containers")
        if int4 == "auto":
            log.warning("%s: keeping int8 containers", msg)
            notes.append(msg + ": kept int8 containers (--int4-weights on forces packing)")
            return q, notes, 0
        notes.append(msg + ": packed anyway (--int4-weights on); those layers run in float")
    notes = [n for n in notes if "stored as int8 codes" not in n] + \
        [f"{len(names)} weights of <= 4 bits packed as INT4/UINT4 (opset raised to 21)"]
    return packed, notes, len(names)


def export_model(model: onnx.ModelProto, plan: QuantPlan, config: ExportConfig = ExportConfig()) -> ExportResult:
    """Export `model` (fused; an unfused model is fused first) quantized by `plan` as `config.format`."""
    from passes import UNITS_KEY
    from qtool.fusion import fuse, is_fused
    from qtool.ortgraph import integer_kernel_report

    if not isinstance(config, ExportConfig):
        raise QtoolError(f"config must be an ExportConfig, got {type(config).__name__}")
    fmt, int4, providers = config.format, config.int4, config.providers
    if not isinstance(model, onnx.ModelProto):
        raise QtoolError(f"model must be an onnx.ModelProto, got {type(model).__name__}")
    if not is_fused(model):
        model, _ = fuse(model)
    _check_plan(model, plan)
    int4_count = 0
    if fmt == "qdq":
        out, notes, int4_count = _export_qdq(model, plan, int4, providers)
    elif fmt == "qoperator":
        from exporters.qoperator import export_qoperator

        out, notes = export_qoperator(model, plan)
    else:
        from exporters.integer import export_integer

        out, notes = export_integer(model, plan, config.requant)
    narrow = sorted({t.bits for t in plan.tensors.values() if t.kind == "weight" and t.bits < 8})
    if fmt != "qdq" and narrow:
        notes.append(f"weights of {'/'.join(map(str, narrow))} bits stored as int8 codes in their narrowed range")
    if fmt != "qdq" and int4 == "on":
        notes.append(f"--int4-weights on applies to the qdq format only; {fmt} keeps int8 weight containers")
    # Intermediate value_info is optional shape info that runtimes infer anyway, and qtool.units describes
    # the fused float graph (stale after export): both dropped to keep deployable files small.
    del out.graph.value_info[:]
    keep = [p for p in out.metadata_props if p.key != UNITS_KEY]
    del out.metadata_props[:]
    out.metadata_props.extend(keep)
    check_model(out, f"exported {fmt}")
    r = integer_kernel_report(out, providers)  # builds an onnxruntime session: the load check
    report = ExportReport(fmt, out.ByteSize(), default_opset(out), dict(Counter(n.op_type for n in out.graph.node)),
                          r.integer_compute, r.float_compute, r.float_fallbacks, dict(r.integer_ops), int4_count, notes)
    return ExportResult(out, report)


def search_member_files(workdir: str | os.PathLike, pick: int) -> tuple[str, str]:
    """(fused model, plan) of front member `pick` of a `qtool search` workdir (its front.json)."""
    import json
    from pathlib import Path

    front_file = Path(workdir) / "front.json"
    if not front_file.is_file():
        raise QtoolError(f"no front.json in {workdir}: not a finished qtool search workdir")
    try:
        members = json.loads(front_file.read_text())["front"]
    except (ValueError, KeyError, TypeError) as e:
        raise QtoolError(f"{front_file} is malformed: {e}") from None
    member = next((m for m in members if m.get("index") == pick), None)
    if member is None:
        raise QtoolError(f"--pick {pick}: the front has members {sorted(m.get('index') for m in members)}")
    if "model_file" not in member or "plan_file" not in member:
        raise QtoolError(f"front member {pick} has no exported model/plan files in {workdir}")
    return str(Path(workdir) / member["model_file"]), str(Path(workdir) / member["plan_file"])
