"""Data sets behind a SPEC string: digits | cifar10:PATH | imagefolder:PATH | npz:PATH.

Every data set is held as uint8 NCHW images + int64 labels; preprocessing (scale, mean, std) is
applied at the edge so the same arrays feed training, calibration and evaluation.
Validation is a deterministic slice of the training split (a fixed-seed permutation; the last
`val_size` images) unless a test split is asked for.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from qtool.errors import QtoolError
from qtool.preprocess import Preprocess

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
SPLIT_SEED = 20151210  # fixed forever: changing it changes every reported val number


@dataclass
class ImageDataset:
    images: np.ndarray  # uint8, N x C x H x W
    labels: np.ndarray  # int64, N
    classes: tuple[str, ...]
    preprocess: Preprocess  # the data set's standard normalization

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, idx: np.ndarray) -> "ImageDataset":
        return ImageDataset(self.images[idx], self.labels[idx], self.classes, self.preprocess)


def cache_dir() -> Path:
    d = Path(os.environ.get("QTOOL_CACHE", Path.home() / ".cache" / "qtool"))
    d.mkdir(parents=True, exist_ok=True)
    return d


# ---------------------------------------------------------------------------------------------
# Readers: each returns {split: (images, labels)} and the class names.

def _read_digits(size: int = 32):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images * (255.0 / 16.0)).astype(np.float32)  # 8x8 in 0..16
    # Bilinear-ish upsampling by repetition then smoothing keeps it dependency-free and exact.
    rep = size // 8
    x = np.repeat(np.repeat(x, rep, axis=1), rep, axis=2)
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    n_test = len(y) // 5
    test, train = perm[-n_test:], np.sort(perm[:-n_test])
    return {"train": (x[train], y[train]), "test": (x[test], y[test])}, tuple(str(i) for i in range(10))


def _decode_image(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise QtoolError(f"cannot decode image {name}: {e}") from None


def _stack(images: list[np.ndarray], labels: list[int], where: str):
    if not images:
        raise QtoolError(f"no images found in {where}")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise QtoolError(f"images in {where} have different sizes {sorted(shapes)[:3]}; resize them first")
    return np.stack(images).transpose(0, 3, 1, 2).copy(), np.asarray(labels, np.int64)


def _read_imagefolder_tree(files: dict[str, callable], where: str):
    """files: relative path -> loader of bytes. Layout: [split/]class/image."""
    by_split: dict[str, dict[str, list[str]]] = {}
    for rel in files:
        parts = Path(rel).parts
        if Path(rel).suffix.lower() not in IMAGE_EXTS or len(parts) < 2:
            continue
        if len(parts) >= 3 and parts[-3] in ("train", "test", "val"):
            split = "test" if parts[-3] == "test" else "train"
        else:
            split = "train"
        by_split.setdefault(split, {}).setdefault(parts[-2], []).append(rel)
    if not by_split:
        raise QtoolError(f"no class folders with images found in {where}")
    classes = tuple(sorted({c for s in by_split.values() for c in s}))
    out = {}
    for split, per_class in by_split.items():
        ims, labels = [], []
        for ci, c in enumerate(classes):
            for rel in sorted(per_class.get(c, [])):
                try:
                    blob = files[rel]()
                except OSError as e:  # a dangling symlink, an unreadable file
                    raise QtoolError(f"cannot read image {rel}: {e.strerror or e}") from None
                ims.append(_decode_image(blob, rel))
                labels.append(ci)
        out[split] = _stack(ims, labels, f"{where} ({split})")
    return out, classes


def _read_folder(path: Path):
    # A symlink whose target is gone is a missing image, not a file to skip silently.
    files = {str(p.relative_to(path)): p.read_bytes for p in path.rglob("*") if p.is_file() or p.is_symlink()}
    return _read_imagefolder_tree(files, str(path))


def _read_targz(path: Path):
    try:
        with tarfile.open(path, "r:*") as tf:
            members = {m.name: m for m in tf.getmembers() if m.isfile()}
            # Read bytes while the archive is open; never extract (no path traversal possible).
            blobs = {name: tf.extractfile(m).read() for name, m in members.items()
                     if Path(name).suffix.lower() in IMAGE_EXTS}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise QtoolError(f"cannot read archive {path}: {e}") from None
    if any(Path(n).name.startswith("data_batch") for n in members):
        raise QtoolError(f"{path}: archives of python batches are not supported; extract it and pass the directory")
    return _read_imagefolder_tree({n: (lambda b=b: b) for n, b in blobs.items()}, str(path))


class _CifarUnpickler(pickle.Unpickler):
    """The official CIFAR-10 python batches are pickles of a dict of bytes/str/int/list and one numpy
    uint8 array. Only the globals that rebuild those may be looked up, so a crafted file cannot
    run code (a plain pickle.load would call whatever callable the file names)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),  # numpy int labels
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("builtins", "dict"), ("builtins", "list"), ("builtins", "bytes"), ("builtins", "str"), ("builtins", "int"),
        ("__builtin__", "dict"), ("__builtin__", "list"), ("__builtin__", "str"), ("__builtin__", "int"),
        ("_codecs", "encode"),  # how python 3 pickles a bytes object under protocol < 3
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batches(path: Path):
    def load(f: Path):
        try:
            with open(f, "rb") as fh:
                d = _CifarUnpickler(fh, encoding="bytes").load()
        except Exception as e:
            raise QtoolError(f"cannot read CIFAR batch {f}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
            raise QtoolError(f"CIFAR batch {f} is not a dict with b'data' and b'labels'")
        try:
            x = np.asarray(d[b"data"], np.uint8)
            y = np.asarray(d[b"labels"], np.int64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise QtoolError(f"CIFAR batch {f} has malformed data or labels: {e}") from None
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y) or len(y) == 0:
            raise QtoolError(f"CIFAR batch {f}: expected N x 3072 data and N labels, got {x.shape} and {y.shape}")
        if y.min() < 0 or y.max() >= len(CIFAR_CLASSES):
            raise QtoolError(f"CIFAR batch {f}: labels outside 0..{len(CIFAR_CLASSES) - 1}")
        return x.reshape(-1, 3, 32, 32), y

    out = {}
    train = sorted(path.glob("data_batch_*"))
    if train:
        xs, ys = zip(*(load(f) for f in train))
        out["train"] = (np.concatenate(xs), np.concatenate(ys))
    if (path / "test_batch").exists():
        out["test"] = load(path / "test_batch")
    return out, CIFAR_CLASSES


def _read_npz(path: Path):
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise QtoolError(f"cannot read npz {path}: {e}") from None
    out = {}
    for split in ("train", "test"):
        xk = next((k for k in (f"x_{split}", f"{split}_x", f"images_{split}") if k in z), None)
        yk = next((k for k in (f"y_{split}", f"{split}_y", f"labels_{split}") if k in z), None)
        if xk and yk:
            out[split] = (z[xk], z[yk])
    if not out:
        xk = next((k for k in ("x", "images", "data") if k in z), None)
        yk = next((k for k in ("y", "labels", "targets") if k in z), None)
        if not (xk and yk):
            raise QtoolError(f"{path}: expected arrays x/y (or images/labels, x_train/y_train); found {list(z.keys())}")
        out["train"] = (z[xk], z[yk])
    for split, (x, y) in out.items():
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise QtoolError(f"{path}: images must be N x C x H x W or N x H x W x C, got shape {x.shape}")
        if x.dtype.kind not in "uifb" or np.asarray(y).dtype.kind not in "uifb":
            raise QtoolError(f"{path}: images and labels must be numeric, got {x.dtype} and {np.asarray(y).dtype}")
        if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
            x = x.transpose(0, 3, 1, 2)
        if x.dtype != np.uint8:
            if not np.isfinite(x).all():
                raise QtoolError(f"{path}: images contain NaN or Inf")
            lo, hi = float(x.min()), float(x.max())
            if lo >= 0.0 and hi <= 1.0:  # pixels / 255
                x = x * 255.0
            elif not (lo >= 0.0 and hi <= 255.0 and np.array_equal(x, np.rint(x))):
                # Rounding and clipping such data into "pixels" would feed the model garbage.
                raise QtoolError(f"{path}: images are {x.dtype} with values in [{lo:.3g}, {hi:.3g}]: neither pixels/255 "
                                 "in [0, 1] nor 0..255 pixels; to feed arrays as they are, name them like the model's "
                                 "inputs")
            x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        y = np.asarray(y).astype(np.int64).reshape(-1)
        if len(y) != len(x):
            raise QtoolError(f"{path}: {len(x)} images but {len(y)} labels")
        if len(x) == 0:
            raise QtoolError(f"{path}: the {split} split has no images")
        if y.min() < 0:
            raise QtoolError(f"{path}: labels must be >= 0, found {int(y.min())}")
        out[split] = (np.ascontiguousarray(x), y)
    n_cls = int(max(int(y.max()) for _, y in out.values())) + 1
    return out, tuple(str(i) for i in range(n_cls))


def _cached(path: Path, reader):
    """Decode once; later loads read a .npz from the cache (keyed by path, size and mtime)."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    f = cache_dir() / f"{path.name}.{key}.npz"
    if f.exists():
        z = np.load(f, allow_pickle=False)
        splits = {s: (z[f"x_{s}"], z[f"y_{s}"]) for s in ("train", "test") if f"x_{s}" in z}
        return splits, tuple(str(c) for c in z["classes"])
    log.info("decoding %s once into %s", path, f)
    splits, classes = reader(path)
    arrays = {f"{k}_{s}": v for s, (x, y) in splits.items() for k, v in (("x", x), ("y", y))}
    tmp = f.with_suffix(".tmp.npz")
    np.savez(tmp, classes=np.asarray(classes), **arrays)
    os.replace(tmp, f)
    return splits, classes


@dataclass(frozen=True)
class Data:
    """Where the data comes from (a SPEC: digits | cifar10:PATH | imagefolder:PATH | npz:PATH) and, for a
    model without qtool's preprocessing metadata, the per-channel normalization to feed it with."""
    spec: str = "digits"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # symbolic input dims fixed where the data cannot give them: ((name, (1, 3, 640, 640)), ...)
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __post_init__(self):
        parse_spec(self.spec)  # a bad SPEC fails before any work
        for entry in self.input_shapes:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)
                    and isinstance(entry[1], tuple) and all(isinstance(v, int) and v > 0 for v in entry[1])):
                raise QtoolError(f"input_shapes entries must be (name, (dims...)) with dims >= 1, got {entry!r}")
        for k in ("mean", "std"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, tuple) or not v
                                  or not all(isinstance(x, (int, float)) for x in v)):
                raise QtoolError(f"{k} must be a non-empty tuple of numbers, got {v!r}")
        if self.std is not None and any(x <= 0 for x in self.std):
            raise QtoolError(f"std values must be > 0, got {self.std}")


def as_data(data) -> Data:
    """A Data from a SPEC string or a Data (None: the embedded digits)."""
    if data is None:
        return Data()
    if isinstance(data, Data):
        return data
    if isinstance(data, str):
        return Data(data)
    raise QtoolError(f"data must be a SPEC string or a qtool.Data, got {type(data).__name__}")


def parse_spec(spec: str) -> tuple[str, Path | None]:
    if spec == "digits":
        return "digits", None
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("cifar10", "imagefolder", "npz", "images"):
        raise QtoolError(f"unknown data spec {spec!r}; use digits, cifar10:PATH, imagefolder:PATH, npz:PATH or "
                         "images:DIR")
    p = Path(rest).expanduser()
    if not p.exists():
        raise QtoolError(f"data path not found: {p}")
    return kind, p


def _load_splits(spec: str):
    kind, p = parse_spec(spec)
    if kind == "digits":
        splits, classes = _read_digits()
        return splits, classes, Preprocess(mean=(0.2,), std=(0.33,))
    if kind == "images":
        raise QtoolError(f"images:{p} has no labels: it serves calibration and label-free evaluation "
                         "(eval --against), not training or top-1")
    if kind == "npz":
        splits, classes = _read_npz(p)
    elif p.is_dir() and (any(p.glob("data_batch_*")) or (p / "test_batch").exists()):
        splits, classes = _read_cifar_batches(p)
    elif p.is_dir():
        splits, classes = _cached(p, _read_folder)
    elif p.is_file() and (p.name.endswith((".tar.gz", ".tgz", ".tar"))):
        splits, classes = _cached(p, _read_targz)
    else:
        raise QtoolError(f"{p}: expected a directory or a .tar.gz archive")
    c = next(iter(splits.values()))[0].shape[1]
    pre = Preprocess(mean=CIFAR_MEAN, std=CIFAR_STD) if kind == "cifar10" and c == 3 else Preprocess(
        mean=(0.5,) * c, std=(0.25,) * c)
    return splits, classes, pre


_MEMO: dict[str, tuple] = {}


def load_dataset(spec: str, split: str = "train", val_size: int | None = None) -> ImageDataset:
    """`train` excludes the validation slice; `val` is that slice; `test` is the test split."""
    if split not in SPLITS:
        raise QtoolError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if spec not in _MEMO:
        _MEMO.clear()  # hold one decoded data set at a time
        _MEMO[spec] = _load_splits(spec)
    splits, classes, pre = _MEMO[spec]
    if split == "test":
        if "test" not in splits:
            raise QtoolError(f"data {spec!r} has no test split; use --split val")
        x, y = splits["test"]
        return ImageDataset(x, y, classes, pre)
    if "train" not in splits:
        raise QtoolError(f"data {spec!r} has no training images")
    x, y = splits["train"]
    idx = split_indices(len(y), split, val_size)
    return ImageDataset(x[idx], y[idx], classes, pre)


def split_indices(n: int, split: str, val_size: int | None = None) -> np.ndarray:
    """The sample indices of the "train" or "val" part of n samples: the val slice is the last `val_size`
    (default 10 %, 5000 from 40000 samples) of a fixed-seed permutation. Val keeps the permutation's order,
    so any prefix (--val-limit, quick runs) is a random sample rather than the first classes of a
    class-ordered folder; train is sorted (its order is shuffled later)."""
    if val_size is None:
        val_size = 5000 if n >= 40000 else max(1, n // 10)
    if not 0 < val_size < n:
        raise QtoolError(f"{n} samples cannot be split into train and val (val size {val_size}): give 2 or more")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    return perm[-val_size:] if split == "val" else np.sort(perm[:-val_size])


def batches(ds: ImageDataset, batch_size: int, pre: Preprocess | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Preprocessed float32 batches in order (for eval and calibration)."""
    pre = pre or ds.preprocess
    for i in range(0, len(ds), batch_size):
        yield pre.apply(ds.images[i:i + batch_size]), ds.labels[i:i + batch_size]


def check_input_matches(model_input_shape: list, ds: ImageDataset, input_name: str) -> None:
    """Fail with one clear line when the data cannot feed the model (channels / size)."""
    dims = list(model_input_shape)
    if len(dims) != 4:
        raise QtoolError(f"model input {input_name!r} has rank {len(dims)}; image data needs N x C x H x W")
    for got, want, what in zip(ds.shape, dims[1:], ("channels", "height", "width")):
        if isinstance(want, int) and want > 0 and want != got:
            raise QtoolError(f"model input {input_name!r} expects {what}={want} but the data has {got}")


def model_image_input(model) -> tuple[str, list]:
    """The single float image input of an ONNX model (name, dims with None for symbolic)."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise QtoolError(f"model has {len(inputs)} inputs; image data feeds exactly one")
    inp = inputs[0]
    tt = inp.type.tensor_type
    if tt.elem_type != 1:
        raise QtoolError(f"model input {inp.name!r} is not float32 (elem_type {tt.elem_type})")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return inp.name, dims


def calib_inputs(model, spec: str, n: int = 512, batch_size: int = 64,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
    """A fixed calibration subset of the training split as ORT input dicts."""
    from qtool.preprocess import resolve_preprocess

    if n < 1:
        raise QtoolError("calibration size must be >= 1")
    ds = load_dataset(spec, "train")
    name, dims = model_image_input(model)
    check_input_matches(dims, ds, name)
    pre = resolve_preprocess(model, mean, std)
    idx = np.sort(np.random.default_rng(SPLIT_SEED + 1).permutation(len(ds))[:n])
    sub = ds.subset(idx)
    bs = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else batch_size
    for x, _ in batches(sub, bs, pre):
        if len(x) == bs or dims[0] is None:
            yield {name: x}


def epoch_batches(ds: ImageDataset, pool, batch_size: int, pre: Preprocess, generator, augment: bool):
    """One shuffled pass over `pool` (a torch index tensor into `ds`): preprocessed float torch batches
    (x, y), CIFAR-augmented when `augment`. Shared by the QAT and dynamic trainers."""
    import torch

    perm = pool[torch.randperm(len(pool), generator=generator)]
    for s in range(0, len(perm), batch_size):
        idx = np.sort(perm[s:s + batch_size].numpy())
        xb = torch.from_numpy(pre.apply(ds.images[idx]))
        yb = torch.from_numpy(ds.labels[idx])
        yield (augment_cifar(xb, generator) if augment else xb), yb


def step_batches(ds: ImageDataset, steps: int, batch_size: int, pre: Preprocess, generator, augment: bool):
    """`steps` batches (x, y) drawn without replacement from a shuffled `ds`, reshuffled whenever the
    next batch would run past its end (so every batch is full): the search's supernet and fine-tunes
    count optimizer steps, not epochs. CIFAR-augmented when `augment`."""
    import torch

    n = len(ds)
    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        idx = np.sort(perm[pos:pos + batch_size].numpy())
        pos += batch_size
        x = torch.from_numpy(pre.apply(ds.images[idx]))
        y = torch.from_numpy(ds.labels[idx])
        yield (augment_cifar(x, generator) if augment else x), y


def augment_cifar(x, generator=None):
    """Standard CIFAR augmentation on a float torch batch: 4-pixel pad + random crop, h-flip."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=generator)
    dy = torch.randint(0, 9, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, x.shape[1], h, w)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    ar = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[ar, rows[:, 0], cols[:, 0]].permute(0, 3, 1, 2)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out.contiguous()
