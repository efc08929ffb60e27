"""Top-1 accuracy of an ONNX model on onnxruntime, batched."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from qtool.data import batches, check_input_matches, load_dataset, model_image_input
from qtool.errors import QtoolError
from qtool.preprocess import resolve_preprocess


@dataclass(frozen=True)
class EvalConfig:
    split: str = "val"  # val (a fixed slice of train) | test | train
    batch_size: int = 256
    limit: int | None = None  # the first N images of the split

    def __post_init__(self):
        if self.split not in ("train", "val", "test"):
            raise QtoolError(f"split must be train, val or test, got {self.split!r}")
        for k, v in (("batch_size", self.batch_size), ("limit", self.limit)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise QtoolError(f"{k} must be an integer >= 1, got {v!r}")


@dataclass
class EvalResult:
    accuracy: float
    n: int
    split: str
    data: str


def make_session(model: onnx.ModelProto, threads: int | None = None, optimize: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise QtoolError(f"onnxruntime cannot load the model: {str(e).strip().splitlines()[0]}") from None


def predict(model: onnx.ModelProto, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    sess = make_session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def evaluate_model(model: onnx.ModelProto, spec: str, config: EvalConfig = EvalConfig(), *,
                   mean=None, std=None) -> EvalResult:
    split, batch_size = config.split, config.batch_size
    ds = load_dataset(spec, split)
    if config.limit:
        ds = ds.subset(np.arange(min(config.limit, len(ds))))
    name, dims = model_image_input(model)
    check_input_matches(dims, ds, name)
    pre = resolve_preprocess(model, mean, std)
    sess = make_session(model)
    fixed = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    correct = 0
    for x, y in batches(ds, fixed or batch_size, pre):
        if fixed and len(x) != fixed:  # a fixed-batch model: pad the last batch
            pad = np.zeros((fixed - len(x),) + x.shape[1:], np.float32)
            out = sess.run(None, {name: np.concatenate([x, pad])})[0][:len(x)]
        else:
            out = sess.run(None, {name: x})[0]
        if out.ndim != 2:
            raise QtoolError(f"model output has shape {out.shape}; expected N x classes logits")
        correct += int((out.argmax(1) == y).sum())
    return EvalResult(correct / len(ds), len(ds), split, spec)
