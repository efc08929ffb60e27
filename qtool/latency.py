"""Latency benchmark of ONNX models on onnxruntime execution providers, side by side.

For every model x EP x batch: median / p90 / p99 latency, throughput and the ratio of the median
to the FIRST model's (same EP and batch), plus the integer-kernel counts of `qtool.ortgraph`, so a
"quantized" model that secretly runs float kernels is visible next to its timing.

Measurement rules:
- Models are measured interleaved, one run each per round (A, B, C, then C, B, A), so machine
  noise (other jobs, frequency changes) hits all of them alike; the alternating order keeps a
  model from always running right after the same neighbour.
- ORT intra-op spinning is off for every session: interleaved sessions would otherwise steal each
  other's cores while idle-spinning (see `_session`).
- A session uses `threads` intra-op threads, one inter-op thread, sequential execution and the
  default ORT_ENABLE_ALL optimizations — what a user's default session does, with pinned threads.
- An EP that is not in `onnxruntime.get_available_providers()`, fails to create a session, or that
  ORT replaced by another one (it does so silently) yields rows marked "unavailable (reason)".
  Nothing is ever measured on CPU in place of the EP asked for.
- A dynamic batch dimension (axis 0) is set to the batch; a fixed one that differs gives a row
  "fixed batch N" instead of an error. Every other dimension must be fixed.
- Latency includes copying outputs back to host memory (plain `session.run`), as a caller sees it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from qtool.errors import QtoolError
import qtool.io
from qtool.io import atomic_write_text, check_output_path, load_model
from qtool.ortgraph import IntegerKernelReport, integer_kernel_report
from qtool.progress import progress as progress_bar

log = logging.getLogger(__name__)

# qtool EP name -> ORT provider list. TensorRT gets CUDA behind it for the nodes TRT rejects,
# the configuration ORT documents; ORT itself appends CPU for nodes no GPU EP takes.
EP_PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider",),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider"),
}

STATUS_OK = "ok"


@dataclass(frozen=True)
class BenchRow:
    model: str
    ep: str
    batch: int
    status: str  # "ok", "unavailable (...)", "fixed batch N", "run failed (...)"
    median_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    throughput: float | None = None  # samples per second at the median latency
    ratio: float | None = None  # median / median of the first model, same EP and batch
    runs: int = 0
    kernels: IntegerKernelReport | None = None
    kernels_note: str | None = None  # why `kernels` is missing where it is

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def to_dict(self) -> dict:
        return {
            "model": self.model, "ep": self.ep, "batch": self.batch, "status": self.status,
            "median_ms": self.median_ms, "p90_ms": self.p90_ms, "p99_ms": self.p99_ms,
            "throughput": self.throughput, "ratio": self.ratio, "runs": self.runs,
            "kernels": self.kernels.to_dict() if self.kernels else None, "kernels_note": self.kernels_note,
        }


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _kernels_cell(row: BenchRow) -> str:
    k = row.kernels
    return "-" if k is None else f"{k.integer_compute}/{k.compute_nodes}"


def _fallback_cell(row: BenchRow) -> str:
    return "-" if row.kernels is None else str(row.kernels.float_fallbacks)


@dataclass(frozen=True)
class BenchReport:
    rows: tuple[BenchRow, ...]
    settings: dict = field(default_factory=dict, hash=False)

    _COLUMNS = ("model", "EP", "batch", "median ms", "p90 ms", "p99 ms", "samples/s", "ratio",
                "int kernels", "float fallbacks", "status")

    def _cells(self, row: BenchRow) -> list[str]:
        return [row.model, row.ep, str(row.batch), _fmt(row.median_ms, ".3f"), _fmt(row.p90_ms, ".3f"),
                _fmt(row.p99_ms, ".3f"), _fmt(row.throughput, ".1f"), _fmt(row.ratio, ".2f"),
                _kernels_cell(row), _fallback_cell(row), row.status]

    def row(self, model: str, ep: str, batch: int) -> BenchRow:
        for r in self.rows:
            if (r.model, r.ep, r.batch) == (model, ep, batch):
                return r
        raise KeyError((model, ep, batch))

    def to_dict(self) -> dict:
        return {"settings": dict(self.settings), "rows": [r.to_dict() for r in self.rows]}

    def to_json(self, path: str | os.PathLike) -> Path:
        p = check_output_path(path)
        atomic_write_text(p, json.dumps(self.to_dict(), indent=2) + "\n")
        return p

    def table(self):
        """A rich Table ("int kernels" = integer compute kernels / all compute nodes)."""
        from rich.table import Table

        s = self.settings
        t = Table(title=f"latency, {s.get('threads')} threads, onnxruntime {s.get('onnxruntime')}")
        for c in self._COLUMNS:
            if c in ("model", "status"):  # long paths and reasons wrap rather than vanish into "…"
                t.add_column(c, overflow="fold")
            else:
                t.add_column(c, justify="left" if c == "EP" else "right", no_wrap=True)
        for r in self.rows:
            t.add_row(*self._cells(r), style=None if r.ok else "dim")
        return t

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self._COLUMNS) + " |",
                 "|" + "|".join("---" if c in ("model", "EP", "status") else "---:" for c in self._COLUMNS) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in self._cells(r)) + " |" for r in self.rows]
        s = self.settings
        lines.append("")
        lines.append(f"onnxruntime {s.get('onnxruntime')}, {s.get('threads')} intra-op threads, "
                     f"{s.get('warmup')} warm-up runs, >= {s.get('runs')} timed runs per row "
                     f"(>= {s.get('min_time_s')} s per EP/batch), interleaved; ratio = median / first model's median; "
                     "int kernels = integer compute kernels / compute nodes in ORT's optimized graph.")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- argument checks

def _as_list(value, what: str) -> list:
    if isinstance(value, str):  # a string is a sequence of characters: never what was meant
        raise QtoolError(f"{what} must be a list, got the string {value!r}")
    try:
        items = list(value)
    except TypeError:
        raise QtoolError(f"{what} must be a list, got {type(value).__name__}") from None
    if not items:
        raise QtoolError(f"{what} list is empty")
    return items


def _check_eps(eps) -> list[str]:
    names = [str(e).strip().lower() for e in _as_list(eps, "EP")]
    for n in names:
        if n not in EP_PROVIDERS:
            raise QtoolError(f"unknown execution provider {n!r} (use one of: {', '.join(EP_PROVIDERS)})")
    if len(set(names)) != len(names):
        raise QtoolError(f"an execution provider is listed twice: {', '.join(names)}")
    return names


def _check_batches(batches) -> list[int]:
    out = []
    for b in _as_list(batches, "batch"):
        try:
            ok = not isinstance(b, (bool, float)) and int(b) == int(str(b).strip())
        except (TypeError, ValueError):
            ok = False
        if not ok or int(b) < 1:
            raise QtoolError(f"bad batch size {b!r}: batch sizes are integers >= 1")
        out.append(int(b))
    if len(set(out)) != len(out):
        raise QtoolError(f"a batch size is listed twice: {', '.join(map(str, out))}")
    return out


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise QtoolError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class BenchConfig:
    eps: tuple[str, ...] = ("cpu",)  # cpu | cuda | tensorrt
    batches: tuple[int, ...] = (1,)
    threads: int = 2  # intra-op threads
    warmup: int = 10
    runs: int = 100  # timed runs per row, at least
    min_time_s: float = 1.0  # and at least this long per EP / batch group
    seed: int = 0  # of the random input feeds
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "eps", tuple(_check_eps(self.eps)))
        object.__setattr__(self, "batches", tuple(_check_batches(self.batches)))
        for name, minimum in (("threads", 1), ("warmup", 0), ("runs", 1)):
            _check_int(getattr(self, name), name, minimum)
        m = self.min_time_s
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0:
            raise QtoolError(f"min_time_s must be a finite number >= 0, got {m!r}")


# ---------------------------------------------------------------- inputs

@dataclass(frozen=True)
class _InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # fixed dims as int; axis 0 may be None (dynamic batch)


def _input_specs(model: onnx.ModelProto, label: str) -> list[_InputSpec]:
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:  # an IR < 4 style input with a default value: ORT does not need it fed
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise QtoolError(f"{label}: input {vi.name!r} is not a tensor (only tensor inputs can be benchmarked)")
        if not tt.HasField("shape"):
            raise QtoolError(f"{label}: input {vi.name!r} has no shape; give the model a fixed input shape")
        dims: list[int | None] = []
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            elif axis == 0:
                dims.append(None)
            else:
                sym = d.dim_param or "?"
                raise QtoolError(f"{label}: input {vi.name!r} has symbolic dimension {sym!r} at axis {axis}; "
                                 "only the batch axis may be dynamic, give the model a fixed shape")
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError):
            raise QtoolError(f"{label}: input {vi.name!r} has unsupported element type {tt.elem_type}") from None
        specs.append(_InputSpec(vi.name, dtype, tuple(dims)))
    return specs


def _fixed_batch(specs: list[_InputSpec], batch: int) -> int | None:
    """The fixed batch that prevents running at `batch`, or None if the model can run it."""
    for s in specs:
        if s.shape and s.shape[0] is not None and s.shape[0] != batch:
            return s.shape[0]
    return None


def _feeds(specs: list[_InputSpec], batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for s in specs:
        shape = tuple(batch if d is None else d for d in s.shape)
        if s.dtype.kind == "f":
            feeds[s.name] = rng.random(shape, dtype=np.float32).astype(s.dtype)
        else:  # integer ids / masks / bools: zeros are valid for embeddings and gathers alike
            feeds[s.name] = np.zeros(shape, dtype=s.dtype)
    return feeds


# ---------------------------------------------------------------- sessions

def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else type(e).__name__


def _session(source: bytes | str, ep: str, threads: int) -> ort.InferenceSession:
    """A session on exactly `ep`; QtoolError with the reason when ORT cannot give one."""
    providers = EP_PROVIDERS[ep]
    available = ort.get_available_providers()
    if providers[0] not in available:
        raise QtoolError(f"{providers[0]} not in this onnxruntime build")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Interleaved sessions share the cores: with spinning on, the idle pool of the model just
    # measured keeps spinning and steals the next model's cores (ResNet-18 measured 17 ms instead
    # of 5.7 ms). Off for every session, so all models are timed alike.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        sess = ort.InferenceSession(source, so, providers=[p for p in providers if p in available])
    except Exception as e:
        raise QtoolError(f"session failed: {_first_line(e)}") from None
    # ORT retries with CPU (printing a warning) when an EP cannot be created: refuse that result.
    if sess.get_providers()[0] != providers[0]:
        raise QtoolError(f"onnxruntime fell back to {sess.get_providers()[0]}")
    return sess


@dataclass
class _Model:
    label: str
    proto: onnx.ModelProto
    source: bytes | str
    specs: list[_InputSpec]


def _load(paths: Sequence) -> list[_Model]:
    models, seen = [], {}
    for p in paths:
        if not isinstance(p, (str, os.PathLike)):
            raise QtoolError(f"model paths must be file paths, got {type(p).__name__}")
        proto = load_model(p)
        label = str(p)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:  # the same file twice (e.g. a noise check): keep rows apart
            label = f"{label} #{seen[label]}"
        # Bytes keep an upgraded opset and leave no temp file; a path only past protobuf's 2 GiB.
        source = proto.SerializeToString() if proto.ByteSize() < qtool.io.EXTERNAL_DATA_THRESHOLD else str(p)
        models.append(_Model(label, proto, source, _input_specs(proto, label)))
    return models


# ---------------------------------------------------------------- measurement

def _measure(sessions: dict[str, ort.InferenceSession], feeds: dict[str, dict], warmup: int, runs: int,
             min_time_s: float, advance) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Interleaved timing. Returns per-label latencies (s) and per-label run failures."""
    order = list(sessions)
    times: dict[str, list[float]] = {k: [] for k in order}
    failed: dict[str, str] = {}

    def one(label: str) -> float | None:
        try:
            t0 = time.perf_counter()
            sessions[label].run(None, feeds[label])
            return time.perf_counter() - t0
        except Exception as e:  # e.g. out of device memory at a large batch: that row fails, others go on
            failed[label] = _first_line(e)
            return None

    for _ in range(warmup):
        for label in [k for k in order if k not in failed]:
            one(label)
            advance()
    start, rnd = time.perf_counter(), 0
    while True:
        active = [k for k in order if k not in failed]
        if not active or (rnd >= runs and time.perf_counter() - start >= min_time_s):
            break
        for label in (active if rnd % 2 == 0 else active[::-1]):
            t = one(label)
            if t is not None:
                times[label].append(t)
            if rnd < runs:  # the bar counts the promised runs; extra rounds only fill min_time_s
                advance()
        rnd += 1
    return times, failed


def bench(models: Sequence[str | os.PathLike], config: BenchConfig = BenchConfig()) -> BenchReport:
    """Benchmark `models` on every EP and batch; see the module docstring for the rules.

    `config.runs` is the minimum number of timed runs per row; measuring continues in rounds until each
    EP/batch group has also spent `config.min_time_s` seconds. Bad arguments raise QtoolError.
    """
    if not isinstance(config, BenchConfig):
        raise QtoolError(f"config must be a BenchConfig, got {type(config).__name__}")
    if isinstance(models, (str, os.PathLike)):
        raise QtoolError("models must be a list of paths (got a single path)")
    paths = _as_list(models, "model")
    ep_names, batch_list = list(config.eps), list(config.batches)
    threads, warmup, runs, min_time_s = config.threads, config.warmup, config.runs, config.min_time_s
    loaded = _load(paths)  # every file and shape is checked before any measurement starts

    rng = np.random.default_rng(config.seed)
    rows: list[BenchRow] = []
    bar = progress_bar(disable=not config.progress)  # the project's shared bar style (qtool.progress)
    with bar:
        task = bar.add_task("bench", total=len(ep_names) * len(batch_list) * len(loaded) * (warmup + runs), info="")
        for ep in ep_names:
            sessions: dict[str, ort.InferenceSession] = {}
            unavailable: dict[str, str] = {}
            kernels: dict[str, tuple[IntegerKernelReport | None, str | None]] = {}
            for m in loaded:
                bar.update(task, description=f"{ep}: session {m.label}")
                try:
                    sessions[m.label] = _session(m.source, ep, threads)
                except QtoolError as e:
                    unavailable[m.label] = str(e)
                    log.info("%s on %s unavailable: %s", m.label, ep, e)
                    continue
                try:
                    # the same provider list the timed session got (TensorRT without CUDA stays TensorRT alone)
                    used = [p for p in EP_PROVIDERS[ep] if p in ort.get_available_providers()]
                    kernels[m.label] = (integer_kernel_report(m.proto, used), None)
                except QtoolError as e:  # e.g. TensorRT compiles nodes and cannot save its graph
                    kernels[m.label] = (None, str(e))
            for batch in batch_list:
                bar.update(task, description=f"{ep}, batch {batch}")
                runnable = {}
                for m in loaded:
                    if m.label in sessions and _fixed_batch(m.specs, batch) is None:
                        runnable[m.label] = sessions[m.label]
                feeds = {m.label: _feeds(m.specs, batch, rng) for m in loaded if m.label in runnable}
                times, failed = _measure(runnable, feeds, warmup, runs, min_time_s,
                                         lambda: bar.advance(task))
                base: float | None = None
                for i, m in enumerate(loaded):
                    k, note = kernels.get(m.label, (None, None))
                    if m.label in unavailable:
                        status = f"unavailable ({unavailable[m.label]})"
                    elif m.label not in runnable:
                        status = f"fixed batch {_fixed_batch(m.specs, batch)}"
                    elif m.label in failed:
                        status = f"run failed ({failed[m.label]})"
                    else:
                        status = STATUS_OK
                    if status != STATUS_OK:
                        rows.append(BenchRow(m.label, ep, batch, status, kernels=k, kernels_note=note))
                        continue
                    t = np.asarray(times[m.label]) * 1e3
                    med = float(np.median(t))
                    if i == 0:
                        base = med
                    rows.append(BenchRow(
                        m.label, ep, batch, STATUS_OK, median_ms=med, p90_ms=float(np.percentile(t, 90)),
                        p99_ms=float(np.percentile(t, 99)), throughput=batch * 1e3 / med if med > 0 else None,
                        ratio=(med / base) if base else None, runs=len(t), kernels=k, kernels_note=note))
            sessions.clear()
    settings = {"threads": threads, "warmup": warmup, "runs": runs, "min_time_s": min_time_s,
                "eps": ep_names, "batches": batch_list, "onnxruntime": ort.__version__,
                "available_providers": ort.get_available_providers()}
    return BenchReport(tuple(rows), settings)


def median_latency_ms(models: dict[str, onnx.ModelProto], feed: dict[str, np.ndarray], *, threads: int = 2,
                      warmup: int = 5, runs: int = 30, min_time_s: float = 0.0) -> dict[str, float]:
    """Median latency (ms) of each model on the CPU EP for one given feed, the models interleaved as in
    `bench` (same session settings); the accuracy control times its candidate graphs with it."""
    sessions = {k: _session(m.SerializeToString(), "cpu", threads) for k, m in models.items()}
    times, failed = _measure(sessions, {k: feed for k in sessions}, warmup, runs, min_time_s, lambda: None)
    if failed:
        k = next(iter(failed))
        raise QtoolError(f"onnxruntime cannot run {k}: {failed[k]}")
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}
