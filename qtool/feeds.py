"""Data as feeds: N samples of every model input, whatever the model's inputs are.

A `FeedSet` holds one array per model input (the samples on axis 0) and optional labels; every stage
that runs the model (calibration, evaluation, the error report) iterates `feedset.batches(n)`, i.e.
`{input_name: array}` dicts, the shape of onnxruntime's CalibrationDataReader. `feeds_for(model, data)`
builds one from a data SPEC:

- image SPECs (`digits`, `cifar10:`, `imagefolder:`, an `npz:` of images/labels) feed a model with one
  float image input, preprocessed with the model's metadata or `Data.mean/std`;
- `npz:PATH` whose arrays are named like the model's inputs feeds them as they are (any dtype, rank and
  number of inputs: int64 token ids, attention masks, audio), plus an optional `labels` array;
- `images:DIR` is a folder of image files of any size, resized (shorter side) and center-cropped to the
  model's input size, without labels.

Every input is checked before any run: a missing or unknown name, a dtype other than the model's, a
rank or fixed dimension that differs, are bad input (QtoolError naming the input). Symbolic dimensions
(batch, sequence, H, W) take what the data gives; `input_shapes` fixes them where the data cannot
(`images:` needs H and W of a model whose spatial dims are symbolic).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from qtool.data import IMAGE_EXTS, split_indices
from qtool.errors import QtoolError

MAX_IMAGES = 100_000


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple  # int for a fixed dim, None for a symbolic one

    def describe(self) -> str:
        return f"{self.name} {self.dtype} [{', '.join('?' if d is None else str(d) for d in self.dims)}]"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers)."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not tt.elem_type:
            raise QtoolError(f"model input {vi.name!r} is not a tensor")
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        out.append(InputSpec(vi.name, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    return out


@dataclass
class FeedSet:
    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __post_init__(self):
        sizes = {k: len(v) for k, v in self.arrays.items()}
        if not sizes:
            raise QtoolError("no model inputs to feed")
        if len(set(sizes.values())) != 1:
            raise QtoolError(f"inputs hold different numbers of samples: {sizes}")
        n = next(iter(sizes.values()))
        if n == 0:
            raise QtoolError("the data holds no samples")
        if self.labels is not None and len(self.labels) != n:
            raise QtoolError(f"{n} samples but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def subset(self, idx) -> "FeedSet":
        idx = np.asarray(idx)
        return FeedSet({k: v[idx] for k, v in self.arrays.items()}, None if self.labels is None else self.labels[idx])

    def head(self, n: int | None) -> "FeedSet":
        return self if n is None or n >= len(self) else self.subset(np.arange(n))

    def split(self, split: str, val_size: int | None = None) -> "FeedSet":
        """The train or val part, as `qtool.data.load_dataset` splits images: the val slice is the last
        `val_size` samples of a fixed-seed permutation (10 %, 5000 from 40000 samples)."""
        return self.subset(split_indices(len(self), split, val_size))

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self), batch_size):
            yield {k: v[i:i + batch_size] for k, v in self.arrays.items()}


def parse_input_shapes(specs: dict[str, tuple[int, ...]] | None, inputs: list[InputSpec]) -> dict[str, tuple]:
    """Validate `{name: dims}` against the model: known names, the model's rank, fixed dims kept."""
    out = {}
    for name, dims in (specs or {}).items():
        spec = next((s for s in inputs if s.name == name), None)
        if spec is None:
            raise QtoolError(f"input shape for {name!r}: the model's inputs are {[s.name for s in inputs]}")
        if len(dims) != len(spec.dims):
            raise QtoolError(f"input shape for {name!r} has rank {len(dims)}; the model's input has rank {len(spec.dims)}")
        for i, (got, want) in enumerate(zip(dims, spec.dims)):
            if not isinstance(got, int) or got < 1:
                raise QtoolError(f"input shape for {name!r}: dims must be integers >= 1, got {dims}")
            if want is not None and got != want:
                raise QtoolError(f"input shape for {name!r}: dim {i} is fixed at {want} in the model, got {got}")
        out[name] = tuple(dims)
    return out


def check_feeds(inputs: list[InputSpec], arrays: dict[str, np.ndarray], where: str) -> None:
    """Names, dtypes, ranks and fixed dims (the batch axis excepted) of `arrays` against the model."""
    names = [s.name for s in inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise QtoolError(f"{where} has no array for model input {missing[0]!r} (model inputs: {names}; "
                         f"data arrays: {sorted(arrays)})")
    for s in inputs:
        a = arrays[s.name]
        if a.dtype != s.dtype:
            raise QtoolError(f"{where}: input {s.name!r} is {a.dtype} but the model expects {s.dtype} "
                             "(convert it when writing the data: qtool never casts inputs silently)")
        if a.ndim != len(s.dims):
            raise QtoolError(f"{where}: input {s.name!r} has rank {a.ndim} (shape {a.shape}) but the model expects "
                             f"rank {len(s.dims)} ({s.describe()})")
        for i, (got, want) in enumerate(zip(a.shape, s.dims)):
            if i > 0 and want is not None and got != want:
                raise QtoolError(f"{where}: input {s.name!r} has dim {i} = {got} but the model expects {want} "
                                 f"({s.describe()})")


def check_unnormalized(d) -> None:
    """Named input arrays are fed as they are: a --mean/--std given with them would be silently unused."""
    if d.mean is not None or d.std is not None:
        raise QtoolError(f"--mean/--std normalize image data, but {d.spec} holds arrays named like the model's "
                         "inputs, which are fed as they are: drop --mean/--std or normalize the arrays")


def npz_feeds(path: Path, inputs: list[InputSpec]) -> FeedSet | None:
    """The npz as feeds when its arrays are named like the model's inputs (None: an image npz)."""
    try:
        z = np.load(path, allow_pickle=False)
        keys = set(z.keys())
    except Exception as e:
        raise QtoolError(f"cannot read npz {path}: {e}") from None
    names = {s.name for s in inputs}
    if not keys & names:
        return None
    image_keys = {"x", "images", "data", "x_train", "train_x", "images_train", "x_test", "test_x", "images_test"}
    label_keys = {"y", "labels", "targets", "y_train", "train_y", "labels_train", "y_test", "test_y", "labels_test"}
    if keys & image_keys and keys & label_keys:
        # qtool's image convention (x/y, images/labels, ...), which an input named "x" shares: named arrays win
        # only when every input is there with its dtype and the labels are called "labels"
        feed_ok = all(s.name in keys and z[s.name].dtype == s.dtype for s in inputs)
        if not (feed_ok and keys & label_keys <= {"labels"}):
            return None
    arrays = {k: np.ascontiguousarray(z[k]) for k in names if k in keys}
    check_feeds(inputs, arrays, f"npz:{path}")
    unknown = sorted(keys - names - {"labels"})
    if unknown:
        raise QtoolError(f"npz:{path}: arrays {unknown} match no model input (inputs: {sorted(names)}; "
                         "'labels' is the optional label array)")
    labels = None
    if "labels" in keys:
        labels = np.asarray(z["labels"])
        if labels.dtype.kind not in "iu" or labels.ndim != 1:
            raise QtoolError(f"npz:{path}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    return FeedSet(arrays, labels)


def _image_size(inp: InputSpec, shapes: dict[str, tuple]) -> tuple[int, int, int]:
    dims = shapes.get(inp.name, inp.dims)
    if len(dims) != 4:
        raise QtoolError(f"images: feeds a 4-D image input; model input {inp.describe()} is not one")
    c, h, w = dims[1:]
    if c not in (1, 3):
        raise QtoolError(f"images: model input {inp.name!r} has {c} channels; images give 1 or 3 (NCHW)")
    if h is None or w is None:
        raise QtoolError(f"images: model input {inp.name!r} has symbolic height/width; give them with "
                         f"--input-shape {inp.name}:1x{c}xHxW")
    return c, h, w


def read_image_folder(path: Path, c: int, h: int, w: int, limit: int | None = None) -> np.ndarray:
    """uint8 N x C x H x W of the first `limit` files (sorted): each resized on its shorter side to cover
    H x W, then center-cropped. Only those files are decoded."""
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise QtoolError(f"images:{path}: no image files ({', '.join(sorted(IMAGE_EXTS))})")
    files = files[:min(limit or MAX_IMAGES, MAX_IMAGES)]
    out = np.empty((len(files), c, h, w), np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("L" if c == 1 else "RGB")
                scale = max(h / im.height, w / im.width)
                im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.BILINEAR)
                left, top = (im.width - w) // 2, (im.height - h) // 2
                a = np.asarray(im.crop((left, top, left + w, top + h)), np.uint8)
        except Exception as e:
            raise QtoolError(f"images:{path}: cannot read {f.name}: {e}") from None
        out[i] = a[None] if c == 1 else a.transpose(2, 0, 1)
    return out


def training_feeds(model: onnx.ModelProto, data) -> tuple[FeedSet, FeedSet] | None:
    """(train, val) FeedSets for training on data that is not an image data set (an npz of named
    inputs, an images: folder); None for image SPECs, which train as `qtool.data.ImageDataset`s."""
    from qtool.data import parse_spec

    d = resolve_data(model, data)
    kind, path = parse_spec(d.spec)
    if kind == "npz":
        inputs = model_inputs(model)
        parse_input_shapes(dict(d.input_shapes), inputs)
        if npz_feeds(path, inputs) is None:
            return None
    elif kind != "images":
        return None
    fs = feeds_for(model, d, "train")
    return fs.split("train"), fs.split("val")


def feeds_for(model: onnx.ModelProto, data, split: str = "train", *, input_shapes: dict | None = None,
              limit: int | None = None) -> FeedSet:
    """A FeedSet for `model` from `data` (a SPEC string or qtool.Data); see the module docstring."""
    from qtool.data import check_input_matches, load_dataset, parse_spec
    from qtool.preprocess import resolve_preprocess

    d = resolve_data(model, data)
    inputs = model_inputs(model)
    shapes = parse_input_shapes(input_shapes or dict(d.input_shapes), inputs)
    kind, path = parse_spec(d.spec)
    if kind == "npz":
        fs = npz_feeds(path, inputs)
        if fs is not None:
            check_unnormalized(d)
            return fs.head(limit)
    if len(inputs) != 1 or inputs[0].dtype != np.float32:
        raise QtoolError(f"{d.spec} holds images, which feed one float32 image input; this model's inputs are "
                         f"{'; '.join(s.describe() for s in inputs)} (give npz:PATH with one array per input name)")
    inp = inputs[0]
    pre = resolve_preprocess(model, d.mean, d.std)
    if kind == "images":
        x = read_image_folder(path, *_image_size(inp, shapes), limit=limit)
        return FeedSet({inp.name: pre.apply(x)}, None)
    ds = load_dataset(d.spec, split)
    if limit:
        ds = ds.subset(np.arange(min(limit, len(ds))))
    check_input_matches(list(shapes.get(inp.name, inp.dims)), ds, inp.name)
    return FeedSet({inp.name: pre.apply(ds.images)}, ds.labels)


def digits_fit(model: onnx.ModelProto) -> bool:
    """Whether the embedded digits data (1 x 32 x 32 float images) can feed `model`."""
    inputs = model_inputs(model)
    if len(inputs) != 1 or inputs[0].dtype != np.float32 or len(inputs[0].dims) != 4:
        return False
    return all(want is None or want == got for want, got in zip(inputs[0].dims[1:], (1, 32, 32)))


def resolve_data(model: onnx.ModelProto, data):
    """`data` as a qtool.Data; None means the embedded digits, which only fits 1 x 32 x 32 image models."""
    from qtool.data import as_data

    if data is None and not digits_fit(model):
        raise QtoolError("this model's inputs (" + "; ".join(s.describe() for s in model_inputs(model)) + ") do not "
                         "fit the embedded digits data: give the model's own data (--data SPEC)")
    return as_data(data)


def calibration_feeds(model: onnx.ModelProto, data, n: int, batch_size: int = 16) -> Iterator[dict[str, np.ndarray]]:
    """`n` calibration samples of `data` as feed batches: a fixed random subset of an image SPEC's train
    split (qtool.data.calib_inputs), or the first `n` samples of an npz of named inputs / an images: folder.
    Small batches: calibration reduces one batch while onnxruntime runs the next, and holds every watched
    tensor of two batches at once."""
    from qtool.data import calib_inputs, parse_spec

    d = resolve_data(model, data)
    kind, path = parse_spec(d.spec)
    fs = None
    if kind == "images":
        fs = feeds_for(model, d, "train", limit=n)
    elif kind == "npz":
        inputs = model_inputs(model)
        parse_input_shapes(dict(d.input_shapes), inputs)  # bad --input-shape entries fail here too
        fs = npz_feeds(path, inputs)  # None: an npz of images and labels
        if fs is not None:
            check_unnormalized(d)
    if fs is not None:
        fs = fs.head(n)
        fixed = [s.dims[0] for s in model_inputs(model) if s.dims and s.dims[0] is not None]
        bs = fixed[0] if fixed else batch_size
        return (b for b in fs.batches(bs) if len(next(iter(b.values()))) == bs or not fixed)
    return calib_inputs(model, d.spec, n=n, batch_size=batch_size, mean=d.mean, std=d.std)
