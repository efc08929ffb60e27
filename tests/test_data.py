import tarfile

import numpy as np
import pytest
from PIL import Image

from qtool.data import augment_cifar, calib_inputs, load_dataset
from qtool.errors import QtoolError
from qtool.preprocess import Preprocess


def _write_folder(root, n_per_class=3, classes=("cat", "dog"), size=8, split="train"):
    rng = np.random.default_rng(0)
    for c in classes:
        d = root / split / c
        d.mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_digits_splits_are_disjoint_and_deterministic():
    tr, va, te = (load_dataset("digits", s) for s in ("train", "val", "test"))
    assert tr.shape == (1, 32, 32) and tr.images.dtype == np.uint8
    assert len(tr) + len(va) + len(te) == 1797
    again = load_dataset("digits", "val")
    assert np.array_equal(again.images, va.images) and np.array_equal(again.labels, va.labels)
    # val is a slice of the training split, never overlapping what we train on
    rows = {r.tobytes() + bytes([l]) for r, l in zip(tr.images, tr.labels)}
    overlap = sum(r.tobytes() + bytes([l]) in rows for r, l in zip(va.images, va.labels))
    assert overlap < len(va) * 0.05  # digits has a few exact duplicate images; the slices are disjoint by index


def test_imagefolder_and_targz_read_the_same(tmp_path):
    _write_folder(tmp_path / "f")
    with tarfile.open(tmp_path / "f.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "f" / "train", arcname="train")
    a = load_dataset(f"imagefolder:{tmp_path / 'f'}", "train", val_size=1)
    b = load_dataset(f"cifar10:{tmp_path / 'f.tar.gz'}", "train", val_size=1)
    assert a.classes == b.classes == ("cat", "dog")
    assert np.array_equal(a.images, b.images) and a.shape == (3, 8, 8)


def test_npz_nhwc_float_is_converted(tmp_path):
    x = np.random.default_rng(0).random((20, 8, 8, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20) % 4)
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}", "train", val_size=5)
    assert ds.shape == (3, 8, 8) and len(ds) == 15 and ds.images.dtype == np.uint8


@pytest.mark.parametrize("spec, msg", [
    ("mnist", "unknown data spec"),
    ("cifar10:/no/such/dir", "not found"),
    ("npz:/no/such.npz", "not found"),
])
def test_bad_specs(spec, msg):
    with pytest.raises(QtoolError, match=msg):
        load_dataset(spec)


def test_corrupt_image_is_named(tmp_path):
    _write_folder(tmp_path / "f")
    (tmp_path / "f" / "train" / "cat" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(QtoolError, match="bad.jpg"):
        load_dataset(f"imagefolder:{tmp_path / 'f'}", "train", val_size=1)


def test_npz_label_mismatch(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 1, 4, 4), np.uint8), y=np.zeros(4))
    with pytest.raises(QtoolError, match="5 images but 4 labels"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}")


def test_digits_has_test_split_but_folder_without_one_says_so(tmp_path):
    _write_folder(tmp_path / "f")
    with pytest.raises(QtoolError, match="no test split"):
        load_dataset(f"imagefolder:{tmp_path / 'f'}", "test")


def test_preprocess_and_augment():
    pre = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = pre.apply(np.full((2, 3, 4, 4), 255, np.uint8))
    assert np.allclose(x, 1.0)
    import torch

    t = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    out = augment_cifar(t, torch.Generator().manual_seed(0))
    assert out.shape == t.shape
    # every crop is a translated window of the zero-padded image: values come from the input or padding
    assert set(out.unique().tolist()) <= set(t.unique().tolist()) | {0.0}


def test_calib_inputs_checks_channels():
    from onnx import helper, TensorProto

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 32, 32])])
    m = helper.make_model(g)
    with pytest.raises(QtoolError, match="channels=3 but the data has 1"):
        next(iter(calib_inputs(m, "digits", n=8)))


def test_shared_cifar_split(cifar_spec):
    va = load_dataset(cifar_spec, "val")
    assert len(va) == 5000 and va.shape == (3, 32, 32)
    assert np.bincount(va.labels).min() > 400  # the fixed slice covers every class


def test_val_prefix_is_a_random_sample_not_the_first_classes(tmp_path):
    """Quick runs score the first N val images: on a class-ordered folder they must still cover every class."""
    rng = np.random.default_rng(0)
    for c in range(4):
        d = tmp_path / "f" / "train" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(50):
            Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    va = load_dataset(f"imagefolder:{tmp_path / 'f'}", "val", val_size=100)
    assert set(va.labels[:20].tolist()) == {0, 1, 2, 3}
