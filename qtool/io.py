"""Loading and saving ONNX files safely.

Every command reads models through `load_model` (clear errors for bad files, opset upgrade,
external data that must stay inside the model's folder) and writes through `save_model`
(temp file + rename, so a crash never leaves a partial output and an input is never overwritten).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
from onnx import version_converter

from qtool.errors import QtoolError

log = logging.getLogger(__name__)

MIN_OPSET = 13
# IR 4 made initializers independent of graph.input; qtool's passes treat an initializer that is also a
# graph input as overridable (not a constant), and onnx.checker rejects a new initializer that an IR-3
# graph does not list as an input. Older files are upgraded on load (upgrade_ir_version).
MIN_IR_VERSION = 4
TARGET_OPSET = 17  # upgraded to when older than MIN_OPSET
MAX_OPSET = 22
# Protobuf cannot serialize a single message over 2 GiB: larger models go to external data.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
MAX_MODEL_BYTES = 64 * 1024**3


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise QtoolError("model has no default-domain opset import")


def _fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def _check_size(total: int, p: Path, external: int = 0) -> None:
    """MAX_MODEL_BYTES is read at call time (tests lower it)."""
    if total + external > MAX_MODEL_BYTES:
        what = f"{_fmt_bytes(total + external)} with its external data" if external else _fmt_bytes(total)
        raise QtoolError(f"model {p} is {what}, over the {_fmt_bytes(MAX_MODEL_BYTES)} limit")


def _check_external_data_paths(model: onnx.ModelProto, base_dir: Path) -> int:
    """Refuse external data outside `base_dir`; returns the total size of the external data files."""
    base = base_dir.resolve()
    files: set[Path] = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if loc is None:
            raise QtoolError(f"tensor {tensor.name!r} has external data without a location")
        target = (base / loc).resolve()
        if base != target and base not in target.parents:
            raise QtoolError(f"external data path {loc!r} of tensor {tensor.name!r} escapes the model's directory")
        if not target.is_file():
            raise QtoolError(f"external data file {loc!r} of tensor {tensor.name!r} not found next to the model")
        files.add(target)
    return sum(f.stat().st_size for f in files)


def _min_ir_version(model: onnx.ModelProto) -> int:
    try:
        return onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except Exception:  # an opset this onnx does not know: the opset checks below name it
        return MIN_IR_VERSION


def upgrade_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """An IR < 4 model as a current-IR one; other models are returned as they are (the same object).

    IR 3 requires every initializer to be listed in graph.input too (as an input with a default). From
    IR 4 on, a listed initializer means "a graph input the caller may override", which is not what an
    IR-3 exporter meant: the names are dropped from graph.input, so the weights are constants again, and
    the IR version is raised to what the model's opsets need (at least 4). The input proto is not changed.
    """
    if model.ir_version >= MIN_IR_VERSION:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name for t in out.graph.initializer}
    keep = [i for i in out.graph.input if i.name not in inits]
    del out.graph.input[:]
    out.graph.input.extend(keep)
    out.ir_version = max(MIN_IR_VERSION, _min_ir_version(out))
    log.info("upgraded IR version %d -> %d (%d initializers dropped from graph.input)", model.ir_version,
             out.ir_version, len(inits))
    return out


def load_model(path: str | os.PathLike, *, upgrade_opset: bool = True, check: bool = True) -> onnx.ModelProto:
    """Read an ONNX file, validate it and bring it to a supported IR version and opset.

    Raises QtoolError (exit 2) naming the problem for anything a user could have got wrong.
    """
    p = Path(path)
    if not p.exists():
        raise QtoolError(f"model file not found: {p}")
    if not p.is_file():
        raise QtoolError(f"model path is not a file: {p}")
    size = p.stat().st_size
    if size == 0:
        raise QtoolError(f"model file is empty: {p}")
    _check_size(size, p)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning, ... for junk bytes
        raise QtoolError(f"not a readable ONNX file ({type(e).__name__}): {p}") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise QtoolError(f"ONNX file has no graph nodes (truncated or not a model?): {p}")
    _check_size(size, p, _check_external_data_paths(model, p.parent))
    try:
        onnx.load_external_data_for_model(model, str(p.parent))
    except Exception as e:
        raise QtoolError(f"cannot read external data of {p}: {e}") from None
    model = upgrade_ir_version(model)
    opset = default_opset(model)
    if opset > MAX_OPSET:
        raise QtoolError(f"opset {opset} is newer than supported (<= {MAX_OPSET}): {p}")
    if opset < MIN_OPSET:
        if not upgrade_opset:
            raise QtoolError(f"opset {opset} is older than supported (>= {MIN_OPSET}): {p}")
        try:
            model = version_converter.convert_version(model, TARGET_OPSET)
        except Exception as e:
            raise QtoolError(f"cannot upgrade opset {opset} to {TARGET_OPSET}: {e}") from None
        log.info("upgraded opset %d -> %d", opset, TARGET_OPSET)
        # the converter keeps the IR version, which may be too old for the new opset
        model.ir_version = max(model.ir_version, _min_ir_version(model))
    if check:
        try:
            onnx.checker.check_model(model if model.ByteSize() < EXTERNAL_DATA_THRESHOLD else str(p))
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QtoolError(f"invalid ONNX model {p}: {msg}") from None
    return model


def check_output_path(out: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Validate an output path before any work is done (so bad paths fail fast, exit 2)."""
    o = Path(out)
    parent = o.parent if str(o.parent) else Path(".")
    if not parent.is_dir():
        raise QtoolError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise QtoolError(f"output directory is not writable: {parent}")
    if o.is_dir():
        raise QtoolError(f"output path is a directory: {o}")
    for i in inputs:
        if Path(i).exists() and o.exists() and o.resolve() == Path(i).resolve():
            raise QtoolError(f"output path equals the input path (inputs are never overwritten): {o}")
        if Path(i).resolve() == o.resolve():
            raise QtoolError(f"output path equals the input path (inputs are never overwritten): {o}")
    return o


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *,
               external_threshold: int | None = None) -> Path:
    """Write atomically; models over the protobuf limit (EXTERNAL_DATA_THRESHOLD, read at call time)
    get their weights in `<name>.data`."""
    p = Path(path)
    if external_threshold is None:
        external_threshold = EXTERNAL_DATA_THRESHOLD
    if model.ByteSize() < external_threshold:
        atomic_write_bytes(p, model.SerializeToString())
        return p
    data_name = p.name + ".data"
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{p.name}.", dir=p.parent if str(p.parent) else "."))
    try:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        onnx.save_model(m, str(tmpdir / p.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        if (tmpdir / data_name).exists():  # no tensor over 1 KiB: everything stayed inline
            os.replace(tmpdir / data_name, p.parent / data_name)
        os.replace(tmpdir / p.name, p)
    finally:
        for f in tmpdir.glob("*"):
            f.unlink()
        tmpdir.rmdir()
    return p


def model_bytes(model: onnx.ModelProto) -> bytes:
    """Serialized model for onnxruntime.InferenceSession(bytes) (no temp files in the cwd)."""
    return model.SerializeToString()


def check_model(model: onnx.ModelProto, what: str) -> None:
    """onnx.checker (full) on a model qtool produced; a failure is qtool's bug (exit 1), not bad input."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise RuntimeError(f"{what} model fails onnx.checker: {str(e).strip().splitlines()[0]}") from e
