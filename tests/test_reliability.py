"""Reliability and safety: a bad-input corpus over the CLI, the inputs that must still work, plan
files, calibration mismatches through the API, and a safe-loading audit of the package.

The CLI contract (docs/DESIGN.md): bad input -> exit 2, exactly one line on stderr naming the problem, no
traceback, no output file (nor temp file) written, every input byte-identical afterwards. Each case
below builds its inputs in `tmp_path`; the whole tree is hashed before and after the call.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from qtool.cli import main
from qtool.errors import QtoolError
from qtool.plan import QuantPlan
import qtool
from qtool.ptq import QuantConfig

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(7)


# ------------------------------------------------------------------------------------------ models

def conv_model(c=1, hw=32, batch="N", opset=17, w=None, b=None, spatial=None, nclass=10, ir_version=8,
               in_type=TP.FLOAT, extra_nodes=(), extra_opsets=()):
    """x[N,c,hw,hw] -> Conv(4) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(nclass) -> y."""
    W = RNG.standard_normal((4, c, 3, 3)).astype(np.float32) * 0.3 if w is None else w
    B = np.zeros(4, np.float32) if b is None else b
    Wfc = RNG.standard_normal((nclass, 4)).astype(np.float32)
    dims = [batch, c, spatial or hw, spatial or hw]
    nodes = [oh.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             oh.make_node("Relu", ["c"], ["r"], name="relu"),
             *extra_nodes,
             oh.make_node("GlobalAveragePool", ["r2" if extra_nodes else "r"], ["g"], name="gap"),
             oh.make_node("Flatten", ["g"], ["f"], name="flat"),
             oh.make_node("Gemm", ["f", "Wfc"], ["y"], transB=1, name="fc")]
    g = oh.make_graph(nodes, "t", [oh.make_tensor_value_info("x", in_type, dims)],
                      [oh.make_tensor_value_info("y", TP.FLOAT, [batch, nclass])],
                      [nh.from_array(W, "W"), nh.from_array(B, "B"), nh.from_array(Wfc, "Wfc")])
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", opset), *extra_opsets], ir_version=ir_version)


def conv_bn_model(var=None):
    var = np.ones(4, np.float32) if var is None else var
    nodes = [oh.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             oh.make_node("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["y"], name="bn")]
    inits = [nh.from_array(RNG.standard_normal((4, 1, 3, 3)).astype(np.float32), "W"),
             nh.from_array(np.ones(4, np.float32), "s"), nh.from_array(np.zeros(4, np.float32), "bb"),
             nh.from_array(np.zeros(4, np.float32), "mu"), nh.from_array(var, "var")]
    g = oh.make_graph(nodes, "t", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 1, 32, 32])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 4, 32, 32])], inits)
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])


def ir3(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as an IR-3 file writes it: every initializer listed in graph.input too."""
    model.ir_version = 3
    names = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        if t.name not in names:
            model.graph.input.append(oh.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return model


def single_op_model(node, in_shape, out_shape, opset=17, ir_version=8, inits=(), extra_opsets=()):
    g = oh.make_graph([node], "t", [oh.make_tensor_value_info("x", TP.FLOAT, in_shape)],
                      [oh.make_tensor_value_info("y", TP.FLOAT, out_shape)], list(inits))
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", opset), *extra_opsets], ir_version=ir_version)


def save(model, path: Path) -> str:
    onnx.save(model, str(path))
    return str(path)


def good(t: Path) -> str:
    return save(conv_model(), t / "m.onnx")


def nan_weights(value=np.nan):
    w = RNG.standard_normal((4, 1, 3, 3)).astype(np.float32)
    w[1, 0, 2, 2] = value
    return conv_model(w=w)


def two_input_model():
    g = oh.make_graph([oh.make_node("Add", ["x", "z"], ["s"]),
                       oh.make_node("Conv", ["s", "W"], ["y"], name="conv")], "t",
                      [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 1, 32, 32]),
                       oh.make_tensor_value_info("z", TP.FLOAT, ["N", 1, 32, 32])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 2, 30, 30])],
                      [nh.from_array(np.ones((2, 1, 3, 3), np.float32), "W")])
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])


def int_input_model():
    """Integer image input cast to float inside the graph: image data (float32) cannot feed it."""
    m = conv_model()
    m.graph.input[0].type.tensor_type.elem_type = TP.INT64
    m.graph.node[0].input[0] = "xf"
    m.graph.node.insert(0, oh.make_node("Cast", ["x"], ["xf"], to=TP.FLOAT, name="cast"))
    return m


def conv_only_model():
    """Output N x 4 x 32 x 32: not logits."""
    g = oh.make_graph([oh.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1], name="conv")], "t",
                      [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 1, 32, 32])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 4, 32, 32])],
                      [nh.from_array(np.ones((4, 1, 3, 3), np.float32), "W")])
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])


def custom_op_model():
    custom = oh.make_node("FooBar", ["r"], ["r2"], domain="acme", name="foobar")
    return conv_model(extra_nodes=[custom], extra_opsets=[oh.make_opsetid("acme", 1)])


# -------------------------------------------------------------------------------------------- data

def npz(t: Path, name="d.npz", n=20, hw=32, c=1, labels=None, x=None) -> str:
    x = np.full((n, c, hw, hw), 128, np.uint8) if x is None else x
    y = np.arange(n) % 10 if labels is None else labels
    np.savez(t / name, x=x, y=y)
    return f"npz:{t / name}"


def png_bytes(hw=8, value=0) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.full((hw, hw, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def image_folder(t: Path, files: dict[str, bytes]) -> str:
    root = t / "imgs"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    root.mkdir(exist_ok=True)
    return f"imagefolder:{root}"


def dangling_image(t: Path) -> str:
    spec = image_folder(t, {"a/1.png": png_bytes(), "b/2.png": png_bytes()})
    os.symlink(t / "deleted.png", t / "imgs" / "b" / "gone.png")
    return spec


class _Evil:
    """Pickles into a call of os.mkdir(marker): loading it with plain pickle would run it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def evil_cifar(t: Path) -> str:
    d = t / "cifar-10-batches-py"
    d.mkdir()
    payload = {b"data": _Evil(str(t / "PWNED")), b"labels": [0]}
    (d / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=2))
    return f"cifar10:{d}"


def cifar_batch(t: Path, payload) -> str:
    d = t / "cifar-10-batches-py"
    d.mkdir(exist_ok=True)
    (d / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=2))
    return f"cifar10:{d}"


# --------------------------------------------------------------------------------- the bad corpus

def Q(*extra, model=good, data=None):
    """quantize argv builder: model(t) gives the input path; data(t) gives a --data SPEC."""
    def build(t):
        argv = ["quantize", model(t) if callable(model) else model, "--calib-size", "8", "-o", str(t / "out.onnx")]
        if data is not None:
            argv += ["--data", data(t)]
        return argv + [a.replace("{t}", str(t)) for a in extra]
    return build


def F(model, out="out.onnx"):
    return lambda t: ["fuse", model(t), "-o", str(t / out) if out is not None else model(t)]


def E(model=good, data=None, *extra):
    def build(t):
        argv = ["eval", model(t)]
        if data is not None:
            argv += ["--data", data(t)]
        return argv + list(extra)
    return build


def B(model=good, *extra):
    return lambda t: ["bench", model(t), "--runs", "1", "--warmup", "0", *[a.replace("{t}", str(t)) for a in extra]]


def T(*extra):
    return lambda t: ["train", "--model", "lenet5", "--epochs", "1", *[a.replace("{t}", str(t)) for a in extra]]


def raw(data: bytes, name="m.onnx"):
    def build(t):
        (t / name).write_bytes(data)
        return str(t / name)
    return build


def truncated(t: Path) -> str:
    b = conv_model().SerializeToString()
    (t / "m.onnx").write_bytes(b[: len(b) // 2])
    return str(t / "m.onnx")


def model_dir(t: Path) -> str:
    (t / "dir.onnx").mkdir()
    return str(t / "dir.onnx")


def opset(v):
    def build(t):
        m = conv_model()
        m.opset_import[0].version = v
        return save(m, t / "m.onnx")
    return build


def un_upgradable(t: Path) -> str:  # ImageScaler was removed from ONNX: opset 8 cannot become 17
    return save(single_op_model(oh.make_node("ImageScaler", ["x"], ["y"], scale=2.0), [1, 1, 4, 4], [1, 1, 4, 4],
                                opset=8, ir_version=3), t / "m.onnx")


def no_nodes(t: Path) -> str:
    g = oh.make_graph([], "t", [oh.make_tensor_value_info("x", TP.FLOAT, [1])], [oh.make_tensor_value_info("x", TP.FLOAT, [1])])
    return save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)]), t / "m.onnx")


def dangling_input(t: Path) -> str:  # a node reads a tensor nobody produces
    m = conv_model()
    m.graph.node[1].input[0] = "nowhere"
    return save(m, t / "m.onnx")


def M(factory):
    return lambda t: save(factory(), t / "m.onnx")


def same_as_input(t: Path) -> list[str]:
    return ["fuse", good(t), "-o", str(t / "m.onnx")]


def readonly_dir(t: Path) -> list[str]:
    ro = t / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):
        ro.chmod(0o700)
        pytest.skip("running as root: a read-only directory is still writable, so there is nothing to refuse")
    return ["fuse", good(t), "-o", str(ro / "out.onnx")]


def out_is_dir(t: Path) -> list[str]:
    (t / "outdir").mkdir()
    return ["fuse", good(t), "-o", str(t / "outdir")]


def relu_only():
    return single_op_model(oh.make_node("Relu", ["x"], ["y"]), ["N", 1, 32, 32], ["N", 1, 32, 32])


CASES = [
    # -- fuse: unreadable / invalid model files
    ("fuse-empty-file", F(raw(b"")), "model file is empty"),
    ("fuse-random-bytes", F(raw(np.random.default_rng(0).bytes(4096))), "not a readable ONNX file"),
    ("fuse-truncated", F(truncated), "not a readable ONNX file"),
    ("fuse-missing-file", lambda t: ["fuse", str(t / "nope.onnx"), "-o", str(t / "out.onnx")], "model file not found"),
    ("fuse-model-is-dir", F(model_dir), "model path is not a file"),
    ("fuse-opset-too-new", F(opset(30)), "opset 30 is newer than supported"),
    ("fuse-opset-old-not-upgradable", F(un_upgradable), "cannot upgrade opset 8 to 17"),
    ("fuse-no-nodes", F(no_nodes), "no graph nodes"),
    ("fuse-dangling-input", F(dangling_input), "invalid ONNX model"),
    ("fuse-nan-weight", F(M(nan_weights)), "weight 'W' of Conv 'conv' has 1 NaN/Inf"),
    ("fuse-inf-bn-var", F(M(lambda: conv_bn_model(var=np.array([1, np.inf, 1, 1], np.float32)))),
     "weight 'var' of BatchNormalization 'bn'"),
    # -- fuse: output paths
    ("fuse-out-missing-dir", lambda t: ["fuse", good(t), "-o", str(t / "no" / "such" / "out.onnx")],
     "output directory does not exist"),
    ("fuse-out-readonly-dir", readonly_dir, "output directory is not writable"),
    ("fuse-out-is-dir", out_is_dir, "output path is a directory"),
    ("fuse-out-equals-input", same_as_input, "output path equals the input path"),
    # -- quantize: models
    ("quantize-random-bytes", Q(model=raw(b"\x08\x07garbage" * 50)), "not a readable ONNX file"),
    ("quantize-opset-too-new", Q(model=opset(99)), "opset 99 is newer than supported"),
    ("quantize-nan-weight", Q(model=M(nan_weights)), "weight 'W' of Conv 'conv' has 1 NaN/Inf"),
    ("quantize-inf-weight", Q(model=M(lambda: nan_weights(-np.inf))), "weight 'W' of Conv 'conv' has 1 NaN/Inf"),
    ("quantize-nothing-to-quantize", Q(model=M(relu_only)), "nothing to quantize"),
    ("quantize-unsupported-op", Q(model=M(custom_op_model)), "onnxruntime cannot load the model for calibration"),
    ("quantize-int64-input", Q(model=M(int_input_model)), "do not fit the embedded digits data: give the model's own data"),
    ("quantize-int64-input-image-data", Q(model=M(int_input_model), data=lambda t: "digits"),
     "model input 'x' is not float32"),
    ("quantize-ill-typed-model", Q(model=M(lambda: conv_model(in_type=TP.INT64)), data=lambda t: npz(t)),
     "onnxruntime cannot load the model"),
    ("quantize-two-inputs", Q(model=M(two_input_model)), "(x float32 [?, 1, 32, 32]; z float32 [?, 1, 32, 32]) do not "
     "fit the embedded digits data: give the model's own data (--data SPEC)"),
    ("quantize-two-inputs-image-data", Q(model=M(two_input_model), data=lambda t: "digits"), "model has 2 inputs"),
    ("quantize-out-equals-input", lambda t: ["quantize", good(t), "-o", str(t / "m.onnx")],
     "output path equals the input path"),
    ("quantize-plan-out-equals-input", Q("--plan-out", "{t}/m.onnx"), "output path equals the input path"),
    ("quantize-plan-out-equals-out", Q("--plan-out", "{t}/out.onnx"), "two outputs are the same path"),
    ("quantize-plan-out-missing-dir", Q("--plan-out", "{t}/nodir/plan.json"), "output directory does not exist"),
    # -- quantize: calibration data
    ("quantize-3ch-model-no-data", Q(model=M(lambda: conv_model(c=3))), "do not fit the embedded digits data"),
    ("quantize-3ch-model-digits", Q(model=M(lambda: conv_model(c=3)), data=lambda t: "digits"),
     "expects channels=3 but the data has 1"),
    ("quantize-wrong-size", Q(data=lambda t: npz(t, hw=28)), "expects height=32 but the data has 28"),
    ("quantize-unknown-spec", Q(data=lambda t: "mnist"), "unknown data spec 'mnist'"),
    ("quantize-unknown-spec-kind", Q(data=lambda t: "s3:bucket/x"), "unknown data spec"),
    ("quantize-data-path-missing", Q(data=lambda t: f"npz:{t}/none.npz"), "data path not found"),
    ("quantize-calib-size-0", Q("--calib-size", "0"), "calib_size must be an integer >= 1"),
    ("quantize-empty-npz", Q(data=lambda t: npz(t, n=0)), "the train split has no images"),
    ("quantize-npz-label-count", Q(data=lambda t: npz(t, labels=np.zeros(3, np.int64))), "20 images but 3 labels"),
    ("quantize-npz-nan-images", Q(data=lambda t: npz(t, x=np.full((20, 1, 32, 32), np.nan, np.float32))),
     "images contain NaN or Inf"),
    ("quantize-npz-not-npz", Q(data=lambda t: (t / "d.npz").write_bytes(b"junk") and f"npz:{t}/d.npz"),
     "cannot read npz"),
    ("quantize-npz-wrong-keys", Q(data=lambda t: (np.savez(t / "d.npz", a=np.zeros(3)), f"npz:{t}/d.npz")[1]),
     "expected arrays x/y"),
    ("quantize-imagefolder-corrupt", Q(data=lambda t: image_folder(t, {"a/1.png": png_bytes(), "b/2.png": b"notpng"})),
     "cannot decode image b/2.png"),
    ("quantize-imagefolder-truncated", Q(data=lambda t: image_folder(t, {"a/1.png": png_bytes(32)[:40]})),
     "cannot decode image a/1.png"),
    ("quantize-imagefolder-missing-image", Q(data=dangling_image), "cannot read image b/gone.png"),
    ("quantize-imagefolder-empty", Q(data=lambda t: image_folder(t, {})), "no class folders with images"),
    ("quantize-imagefolder-mixed-sizes",
     Q(data=lambda t: image_folder(t, {"a/1.png": png_bytes(8), "b/2.png": png_bytes(16)})), "different sizes"),
    ("quantize-cifar-malicious-pickle", Q(data=evil_cifar), "refusing to load global posix.mkdir"),
    ("quantize-cifar-not-a-dict", Q(data=lambda t: cifar_batch(t, [1, 2, 3])), "is not a dict with b'data'"),
    ("quantize-cifar-bad-shape",
     Q(data=lambda t: cifar_batch(t, {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})),
     "expected N x 3072 data"),
    ("quantize-bad-mean", Q("--mean", "a,b"), "--mean must be comma-separated numbers"),
    ("quantize-bad-std", Q("--std", "0"), "std values must be > 0"),
    # -- eval
    ("eval-empty-file", E(raw(b"")), "model file is empty"),
    ("eval-3ch-model-digits", E(M(lambda: conv_model(c=3)), lambda t: "digits"), "expects channels=3 but the data has 1"),
    ("eval-no-test-split", E(good, lambda t: npz(t), "--split", "test"), "has no test split"),
    ("eval-negative-labels", E(good, lambda t: npz(t, labels=-np.ones(20, np.int64))), "labels must be >= 0"),
    ("eval-not-logits", E(M(conv_only_model)), "top-1 needs N x classes scores (compare with the FP32 model instead"),
    ("eval-unknown-spec", E(good, lambda t: "digits:extra"), "unknown data spec"),
    # -- bench
    ("bench-symbolic-spatial", B(M(lambda: conv_model(spatial="H"))), "symbolic dimension 'H' at axis 2"),
    ("bench-random-bytes", B(raw(b"\xff" * 100)), "not a readable ONNX file"),
    ("bench-unknown-ep", B(good, "--ep", "tpu"), "unknown execution provider 'tpu'"),
    ("bench-batch-0", B(good, "--batch", "0"), "--batch values must be >= 1"),
    ("bench-json-equals-input", B(good, "--json", "{t}/m.onnx"), "output path equals the input path"),
    ("bench-json-missing-dir", B(good, "--json", "{t}/no/r.json"), "output directory does not exist"),
    # -- train (fails before any training step)
    ("train-unknown-model", lambda t: ["train", "--model", "alexnet", "-o", str(t / "out.onnx")], "unknown model 'alexnet'"),
    ("train-unknown-spec", T("--data", "imagenet", "-o", "{t}/out.onnx"), "unknown data spec 'imagenet'"),
    ("train-empty-npz", lambda t: T("--data", npz(t, n=0), "-o", "{t}/out.onnx")(t), "the train split has no images"),
    ("train-corrupt-images",
     lambda t: T("--data", image_folder(t, {"a/1.png": b"\x89PNG junk"}), "-o", "{t}/out.onnx")(t), "cannot decode image"),
    ("train-out-missing-dir", T("-o", "{t}/nodir/out.onnx"), "output directory does not exist"),
    ("train-out-is-dir", lambda t: (t / "o").mkdir() or T("-o", "{t}/o")(t), "output path is a directory"),
    ("train-epochs-0", T("--epochs", "0", "-o", "{t}/out.onnx"), "--epochs must be >= 1"),
    ("train-data-missing", T("--data", "cifar10:{t}/none", "-o", "{t}/out.onnx"), "data path not found"),
    # -- dynamic: training settings
    ("dynamic-negative-lr", lambda t: ["dynamic", good(t), "--lr", "-1", "-o", str(t / "dyn")], "lr must be > 0"),
    ("dynamic-zero-controller-lr", lambda t: ["dynamic", good(t), "--controller-lr", "0", "-o", str(t / "dyn")],
     "controller_lr must be > 0"),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root (hidden ones too): a hash for files, 'dir' for folders."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_line_error(capsys, rc: int, expect: str, code: int = 2) -> str:
    err = capsys.readouterr().err
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert expect in lines[0], f"{expect!r} not in {lines[0]!r}"
    return lines[0]


def test_corpus_is_large_and_covers_every_command():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)
    for cmd in ("fuse", "quantize", "eval", "bench", "train"):
        assert sum(c[0].startswith(cmd + "-") for c in CASES) >= 4, cmd


@pytest.mark.parametrize("build, expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_one_line_nothing_written(build, expect, tmp_path, capsys):
    argv = build(tmp_path)
    before = snapshot(tmp_path)
    rc = main(argv)
    one_line_error(capsys, rc, expect)
    # No output, no temp file, no .pt checkpoint, and every input byte-identical.
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "PWNED").exists()  # the malicious pickle's payload never ran


# ------------------------------------------------------------------------- inputs that must work

def ort_run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name, factory", [
    ("dynamic-batch", lambda: conv_model(batch="batch")),
    ("symbolic-spatial", lambda: conv_model(spatial="H")),
    ("unnamed-dims", lambda: conv_model(batch=None)),
    ("fixed-batch-4", lambda: conv_model(batch=4)),
    ("old-opset-9-upgraded", lambda: conv_model(opset=9, ir_version=4)),
    ("ir3-initializers-in-inputs", lambda: ir3(conv_model(opset=9))),
    ("ir3-opset-13", lambda: ir3(conv_model(opset=13))),
])
def test_fuse_and_quantize_work(name, factory, tmp_path, capsys):
    src = save(factory(), tmp_path / "m.onnx")
    before = (tmp_path / "m.onnx").read_bytes()
    assert main(["fuse", src, "-o", str(tmp_path / "f.onnx")]) == 0, capsys.readouterr().err
    assert main(["quantize", src, "--calib-size", "8", "-o", str(tmp_path / "q.onnx")]) == 0, capsys.readouterr().err
    assert (tmp_path / "m.onnx").read_bytes() == before
    q = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(q, full_check=True)
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) >= 3
    batch = 4
    x = np.random.default_rng(0).random((batch, 1, 32, 32), dtype=np.float32)
    ref, out = ort_run(onnx.load(str(tmp_path / "f.onnx")), x), ort_run(q, x)
    assert out.shape == ref.shape == (batch, 10) and np.isfinite(out).all()
    if name == "old-opset-9-upgraded":
        assert next(i.version for i in q.opset_import if i.domain in ("", "ai.onnx")) >= 13
    if name.startswith("ir3"):  # upgraded: the weights are constants again, the only input is x
        f = onnx.load(str(tmp_path / "f.onnx"))
        assert f.ir_version >= 4 and [i.name for i in f.graph.input] == ["x"]
        if name == "ir3-opset-13":  # (opset 9's Gemm wants a C input: onnxruntime runs only the upgraded one)
            np.testing.assert_allclose(ref, ort_run(src, x), rtol=1e-4, atol=1e-5)  # fusing kept the numbers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx", "m.onnx", "q.onnx"]  # no temp files left


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_upgrade_ir_version_drops_initializer_inputs():
    from qtool.io import upgrade_ir_version

    old = ir3(conv_model(opset=17))
    before = old.SerializeToString()
    with pytest.raises(onnx.checker.ValidationError):  # why: onnx refuses an IR-3 graph with a fresh initializer
        bad = onnx.ModelProto()
        bad.CopyFrom(old)
        bad.graph.initializer.append(nh.from_array(np.zeros(1, np.float32), "extra"))
        onnx.checker.check_model(bad)
    new = upgrade_ir_version(old)
    assert old.SerializeToString() == before  # the caller's proto is untouched
    assert new.ir_version == 8 and [i.name for i in new.graph.input] == ["x"]
    assert {t.name for t in new.graph.initializer} == {"W", "B", "Wfc"}
    onnx.checker.check_model(new, full_check=True)
    x = RNG.random((2, 1, 32, 32), dtype=np.float32)
    np.testing.assert_array_equal(ort_run(old, x), ort_run(new, x))
    cur = conv_model()
    assert upgrade_ir_version(cur) is cur  # IR >= 4: nothing to do (listed initializers stay overridable)


def _light_squeezenet() -> Path:
    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"
    if not path.is_file():
        pytest.skip("the onnx wheel ships no light_squeezenet.onnx")
    return path


def test_old_ir3_zoo_model_fuses_quantizes_and_runs(tmp_path):
    """SqueezeNet 1.0 from the onnx wheel: IR 3, opset 9, weights as ConstantOfShape (all 0.02), every
    initializer also a graph input. Before the upgrade, fuse ended in exit 1 (checker: "in initializer
    but not in graph input"). Its weights are constant, so the biases are randomized here (they are
    plain initializers) to give the classes distinct logits to compare."""
    m = onnx.load(str(_light_squeezenet()))
    assert m.ir_version == 3 and len(m.graph.input) > 1
    r = np.random.default_rng(0)
    for t in m.graph.initializer:
        if t.data_type == TP.FLOAT:
            t.CopyFrom(nh.from_array(r.normal(size=tuple(t.dims)).astype(np.float32), t.name))
    src = save(m, tmp_path / "sq.onnx")
    loaded = qtool.load_model(src)
    assert loaded.ir_version >= 8 and [i.name for i in loaded.graph.input] == ["data_0"]
    fused = qtool.fuse(loaded).model
    onnx.checker.check_model(fused, full_check=True)
    x = r.normal(size=(1, 3, 224, 224)).astype(np.float32)
    ref = ort_run(m, x)  # onnxruntime still runs the original IR-3 file
    np.testing.assert_allclose(ort_run(fused, x), ref, rtol=1e-4, atol=1e-6)
    q = qtool.quantize(fused, [{"data_0": r.normal(size=(1, 3, 224, 224)).astype(np.float32)}])
    assert sum(n.op_type == "QuantizeLinear" for n in q.model.graph.node) >= 20
    out = ort_run(q.model, x)
    assert np.argmax(out) == np.argmax(ref) and cosine(out, ref) > 0.98


def test_fuse_leaves_an_unsupported_op_alone(tmp_path, capsys):
    src = save(custom_op_model(), tmp_path / "m.onnx")
    assert main(["fuse", src, "-o", str(tmp_path / "f.onnx")]) == 0
    f = onnx.load(str(tmp_path / "f.onnx"))
    assert [n.op_type for n in f.graph.node].count("FooBar") == 1
    assert {"Conv", "Gemm"} <= {n.op_type for n in f.graph.node}


def test_fuse_without_conv_or_gemm_is_a_clean_no_op(tmp_path, capsys):
    # fuse has nothing to fold but is still a valid transformation; quantize refuses (see the corpus).
    src = save(relu_only(), tmp_path / "m.onnx")
    assert main(["fuse", src, "-o", str(tmp_path / "f.onnx")]) == 0
    assert "0 quantization units" in capsys.readouterr().out
    assert [n.op_type for n in onnx.load(str(tmp_path / "f.onnx")).graph.node] == ["Relu"]


def test_nothing_to_quantize_is_consistent_in_the_api():
    with pytest.raises(QtoolError, match="nothing to quantize"):
        from qtool.ptq import quantize
        quantize(relu_only(), [{"x": np.zeros((1, 1, 32, 32), np.float32)}])


@pytest.mark.parametrize("calib", ["minmax", "percentile", "entropy", "mse"])
@pytest.mark.parametrize("pixel", [0, 128])
def test_constant_activations_give_positive_finite_scales(calib, pixel, tmp_path, capsys):
    """All-zero weights and constant images: every activation is constant (the input all 0 with
    pixel 0: a zero range); no division by zero, every scale positive and finite."""
    src = save(conv_model(w=np.zeros((4, 1, 3, 3), np.float32), b=np.full(4, 0.5, np.float32)), tmp_path / "m.onnx")
    data = npz(tmp_path, x=np.full((20, 1, 32, 32), pixel, np.uint8))
    argv = ["quantize", src, "--data", data, "--calib", calib, "--calib-size", "8",
            "-o", str(tmp_path / "q.onnx"), "--plan-out", str(tmp_path / "plan.json")]
    if not pixel:
        # Known limit (below): with pixel 0 the bias rounds away and every logit is the same constant,
        # which the collapse check reports instead of writing the model.
        assert main(argv) == 2 and "collapsed against FP32" in capsys.readouterr().err
    # The scales are the point here: on this degenerate data the clipping methods may collapse the outputs
    # (entropy clips the one extreme logit), which the collapse check would report.
    argv.append("--allow-collapse")
    rc = main(argv)
    assert rc == 0, capsys.readouterr().err
    plan = QuantPlan.load(tmp_path / "plan.json")
    scales = [s for t in plan.tensors.values() for s in (t.scale if isinstance(t.scale, tuple) else (t.scale,))]
    assert scales and all(np.isfinite(s) and s > 0 for s in scales)
    assert plan.tensors["W"].scale == (1.0,) * 4  # all-zero weight channels
    x = np.full((2, 1, 32, 32), pixel / 255, np.float32)  # what calibration saw (no metadata: pixels/255)
    out = ort_run(str(tmp_path / "q.onnx"), x)
    assert np.isfinite(out).all()
    if pixel and calib == "minmax":  # the other methods may clip the extreme logit on purpose
        # Known limit with pixel 0: a zero-range input (scale 1.0) times an all-zero weight channel
        # (scale 1.0) gives the int32 bias a scale of 1.0, so a bias of 0.5 rounds away.
        out_scale = plan.tensors["y"].scale
        np.testing.assert_allclose(out, ort_run(src, x), atol=2 * out_scale)


def test_real_cifar_format_batches_still_load(tmp_path, capsys):
    """The restricted unpickler accepts what the official CIFAR-10 python batches contain."""
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name, n in (("data_batch_1", 30), ("test_batch", 10)):
        payload = {b"batch_label": b"batch", b"labels": [int(v) for v in rng.integers(0, 10, n)],
                   b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
        (d / name).write_bytes(pickle.dumps(payload, protocol=2))
    src = save(conv_model(c=3), tmp_path / "m.onnx")
    assert main(["eval", src, "--data", f"cifar10:{d}", "--split", "test"]) == 0, capsys.readouterr().err
    assert "on 10 samples" in capsys.readouterr().out


# --------------------------------------------------------------------------------- calibration API

def _calib_cases():
    x = np.zeros((2, 1, 32, 32), np.float32)
    return [
        ("wrong-input-name", [{"image": x}], "calibration batch lacks model inputs ['x']"),
        ("wrong-shape", [{"x": np.zeros((2, 3, 32, 32), np.float32)}], "calibration run failed"),
        ("wrong-dtype", [{"x": x.astype(np.float64)}], "calibration run failed"),
        ("wrong-rank", [{"x": np.zeros((2, 32, 32), np.float32)}], "calibration run failed"),
        ("empty", [], "no calibration batches were given"),
        ("not-a-dict", [x], "calibration batches must be dicts"),
    ]


@pytest.mark.parametrize("batches, expect", [c[1:] for c in _calib_cases()], ids=[c[0] for c in _calib_cases()])
def test_mismatched_calibration_batches(batches, expect, tmp_path):
    src = good(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(QtoolError) as ei:
        qtool.quantize(src, batches, QuantConfig())
    assert expect in str(ei.value) and "\n" not in str(ei.value)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------- plan files

def _plan_json(model, **tensor_override):
    entry = {"kind": "weight", "bits": 8, "signed": True, "granularity": "per_channel", "axis": 0,
             "scale": [0.1] * 4, "zero_point": [0] * 4, "narrow": True}
    entry.update(tensor_override.pop("entry", {}))
    d = {"version": 1, "meta": {}, "tensors": {"W": entry}}
    d.update(tensor_override)
    return json.dumps(d)


PLAN_CASES = [
    ("wrong-version", lambda: _plan_json(None, version=2), "unsupported plan version 2"),
    ("no-version", lambda: json.dumps({"tensors": {}}), "unsupported plan version None"),
    ("not-json", lambda: "{'version': 1", "plan is not valid JSON"),
    ("not-an-object", lambda: "[1, 2]", "plan must be a JSON object"),
    ("no-tensors", lambda: json.dumps({"version": 1}), "plan has no 'tensors' object"),
    ("unknown-tensor", lambda: json.dumps({"version": 1, "tensors": {"ghost": {"kind": "activation", "bits": 8,
                                                                              "signed": False}}}),
     "plan tensor 'ghost' is not in the model"),
    ("bits-too-high", lambda: _plan_json(None, entry={"bits": 9}), "bits must be an integer in 2..8, got 9"),
    ("bits-too-low", lambda: _plan_json(None, entry={"bits": 1}), "bits must be an integer in 2..8, got 1"),
    ("bits-not-int", lambda: _plan_json(None, entry={"bits": "8"}), "bits must be an integer"),
    ("negative-scale", lambda: _plan_json(None, entry={"scale": [0.1, -1, 0.1, 0.1]}), "scale must be a finite number > 0"),
    ("zero-scale", lambda: _plan_json(None, entry={"scale": [0.1, 0.0, 0.1, 0.1]}), "scale must be a finite number > 0"),
    ("zp-out-of-range", lambda: _plan_json(None, entry={"zero_point": [0, 0, 0, 200]}), "zero_point must be an integer in"),
    ("channel-count", lambda: _plan_json(None, entry={"scale": [0.1] * 3, "zero_point": [0] * 3}), "3 scales for 4 channels"),
    ("axis-out-of-range", lambda: _plan_json(None, entry={"axis": 7}), "axis 7 out of range for rank 4"),
    ("unknown-field", lambda: _plan_json(None, entry={"color": "red"}), "unknown fields ['color']"),
    ("weight-not-initializer", lambda: json.dumps({"version": 1, "tensors": {"c": {
        "kind": "weight", "bits": 8, "signed": True}}}), "plan weight 'c' is not an initializer"),
]


@pytest.mark.parametrize("text, expect", [c[1:] for c in PLAN_CASES], ids=[c[0] for c in PLAN_CASES])
def test_bad_plan_files(text, expect, tmp_path):
    p = tmp_path / "plan.json"
    p.write_text(text())
    before = p.read_bytes()
    with pytest.raises(QtoolError) as ei:
        QuantPlan.load(p, conv_model())
    msg = str(ei.value)
    assert expect in msg and "\n" not in msg, msg
    assert p.read_bytes() == before


def test_plan_load_missing_file_and_good_plan(tmp_path):
    with pytest.raises(QtoolError, match="plan file not found"):
        QuantPlan.load(tmp_path / "none.json")
    p = tmp_path / "plan.json"
    p.write_text(_plan_json(None))
    plan = QuantPlan.load(p, conv_model())  # the well-formed base of the cases above loads
    assert plan.tensors["W"].scale == (0.1,) * 4


# ------------------------------------------------------------------------------ safe-loading audit

PACKAGE_DIRS = ("qtool", "passes", "exporters", "benchmarks")
# Reviewed uses that never see user data (file, call): reason. A line can also carry `# safe-load: why`.
REVIEWED = {
    ("qtool/bitsearch/executors.py", "pickle.loads"): "process-pool IPC: bytes the parent pickled a moment ago",
}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""  # a method of a computed value (`build_model(x).eval()`): not a module function
    parts.append(node.id)
    return ".".join(reversed(parts))


def _kw_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unsafe_loads(source: str, filename: str) -> list[str]:
    """Unsafe deserialization calls in `source` (AST-based; a regex fallback for unparsable files)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a file someone is mid-way through writing: fall back to text
        bad = []
        for i, line in enumerate(source.splitlines(), 1):
            if re.search(r"torch\.load\(", line) and "weights_only=True" not in line:
                bad.append(f"{filename}:{i}: torch.load without weights_only=True")
            if re.search(r"\byaml\.(load|unsafe_load|full_load)\(|\bpickle\.loads?\(", line):
                bad.append(f"{filename}:{i}: {line.strip()}")
        return bad
    bad = []
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = _dotted(node.func)
        where = f"{filename}:{node.lineno}"
        if (filename, f) in REVIEWED or "# safe-load:" in lines[node.lineno - 1]:
            continue
        if f in ("torch.load", "torch.serialization.load") and not _kw_true(node, "weights_only"):
            bad.append(f"{where}: {f} without weights_only=True")
        elif f in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
            bad.append(f"{where}: {f} (use yaml.safe_load)")
        elif f in ("pickle.load", "pickle.loads", "cPickle.load", "dill.load", "dill.loads", "joblib.load",
                   "pickle.Unpickler", "marshal.loads"):
            bad.append(f"{where}: {f} on data that may come from a user")
        elif f in ("np.load", "numpy.load") and _kw_true(node, "allow_pickle"):
            bad.append(f"{where}: {f}(allow_pickle=True)")
        elif f in ("eval", "exec"):
            bad.append(f"{where}: builtin {f}()")
    return bad


def test_audit_catches_unsafe_calls():
    """The scanner itself must be able to fail (a check that cannot fail checks nothing)."""
    src = ("import torch, yaml, pickle, numpy as np\n"
           "torch.load('a')\ntorch.load('a', weights_only=False)\nyaml.load(s)\npickle.loads(b)\n"
           "np.load(f, allow_pickle=True)\neval('1')\n"
           "torch.load('a', map_location='cpu', weights_only=True)\nyaml.safe_load(s)\nnp.load(f)\nm.eval()\n"
           "build(x).eval()\n")
    found = unsafe_loads(src, "x.py")
    assert [int(b.split(":")[1]) for b in found] == [2, 3, 4, 5, 6, 7]
    assert len(unsafe_loads("torch.load(p)\nyaml.load(x\n", "broken.py")) == 2  # regex fallback
    assert unsafe_loads("pickle.loads(b)  # safe-load: our own IPC bytes\n", "x.py") == []


def test_package_loads_only_safely():
    files = [p for d in PACKAGE_DIRS if (REPO / d).is_dir() for p in sorted((REPO / d).rglob("*.py"))]
    assert any(p.name == "data.py" for p in files) and any(p.name == "training.py" for p in files)
    bad = [b for p in files for b in unsafe_loads(p.read_text(), str(p.relative_to(REPO)))]
    assert not bad, "unsafe deserialization:\n" + "\n".join(bad)
    # The only pickle reader is the restricted CIFAR unpickler, and the checkpoint loader is weights-only.
    data_src = (REPO / "qtool" / "data.py").read_text()
    assert "class _CifarUnpickler(pickle.Unpickler)" in data_src and "def find_class" in data_src
    assert "weights_only=True" in (REPO / "qtool" / "training.py").read_text()


def test_cifar_unpickler_allows_only_array_globals():
    import io

    from qtool.data import _CifarUnpickler
    ok = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [1, 2]}
    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        got = _CifarUnpickler(io.BytesIO(pickle.dumps(ok, protocol=proto)), encoding="bytes").load()
        assert (got[b"data"] == ok[b"data"]).all() and got[b"labels"] == [1, 2]
    for evil in (pickle.dumps(_Evil("/tmp/never")), pickle.dumps(print), pickle.dumps(os.getcwd),
                 b"cbuiltins\neval\n(S'1+1'\ntR."):
        with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
            _CifarUnpickler(io.BytesIO(evil), encoding="bytes").load()


def test_checkpoint_loader_refuses_code(tmp_path):
    """qtool.training.load_checkpoint is weights-only: a pickled callable is rejected, nothing runs."""
    import torch

    from qtool.training import load_checkpoint
    p = tmp_path / "evil.pt"
    torch.save({"model": "lenet5", "state_dict": {}, "payload": _Evil(str(tmp_path / "PWNED"))}, p)
    with pytest.raises(QtoolError, match="cannot load checkpoint"):
        load_checkpoint(p)
    assert not (tmp_path / "PWNED").exists()
