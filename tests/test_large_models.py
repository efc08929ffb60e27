"""Models over protobuf's 2 GiB limit: weights in external data, through every command.

A real 2 GiB model is too big for the test machine, so qtool.io.EXTERNAL_DATA_THRESHOLD is lowered
to 1 KiB: a small synthetic model then takes exactly the code path a large one takes (written with
`<name>.data` beside it, read back with its external data, checked by path). Also: external data
that points outside the model's folder is refused, and so is a model over qtool.io.MAX_MODEL_BYTES.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

import qtool.io
from qtool.cli import main

NCLASS = 256  # the Gemm weight is 256 x 16: 16 KiB float, 4 KiB int8: external after quantization too


def big_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)  # the same weights whichever tests run first
    W = rng.standard_normal((16, 1, 3, 3)).astype(np.float32) * 0.3
    Wfc = rng.standard_normal((NCLASS, 16)).astype(np.float32) * 0.3
    nodes = [oh.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             oh.make_node("Relu", ["c"], ["r"], name="relu"),
             oh.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             oh.make_node("Flatten", ["g"], ["f"], name="flat"),
             oh.make_node("Gemm", ["f", "Wfc", "Bfc"], ["y"], transB=1, name="fc")]
    g = oh.make_graph(nodes, "big", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 1, 32, 32])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, ["N", NCLASS])],
                      [nh.from_array(W, "W"), nh.from_array(np.zeros(16, np.float32), "B"),
                       nh.from_array(Wfc, "Wfc"), nh.from_array(np.zeros(NCLASS, np.float32), "Bfc")])
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])


@pytest.fixture
def low_threshold(monkeypatch):
    monkeypatch.setattr(qtool.io, "EXTERNAL_DATA_THRESHOLD", 1024)


def files(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def external_tensors(path: Path) -> set[str]:
    m = onnx.load(str(path), load_external_data=False)
    return {t.name for t in m.graph.initializer if t.data_location == TP.EXTERNAL}


def run(path: str | Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])  # by path: reads the .data
    return sess.run(None, {"x": x})[0]


def test_save_model_honours_the_threshold_at_call_time(tmp_path, monkeypatch):
    m = big_model()
    qtool.io.save_model(m, tmp_path / "inline.onnx")
    assert sorted(os.listdir(tmp_path)) == ["inline.onnx"] and not external_tensors(tmp_path / "inline.onnx")
    monkeypatch.setattr(qtool.io, "EXTERNAL_DATA_THRESHOLD", 1024)
    qtool.io.save_model(m, tmp_path / "m.onnx")
    assert sorted(os.listdir(tmp_path)) == ["inline.onnx", "m.onnx", "m.onnx.data"]  # no temp dir left
    assert "Wfc" in external_tensors(tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").stat().st_size < 2048 < (tmp_path / "m.onnx.data").stat().st_size
    back = qtool.io.load_model(tmp_path / "m.onnx")
    np.testing.assert_array_equal(nh.to_array(next(t for t in back.graph.initializer if t.name == "Wfc")),
                                  nh.to_array(next(t for t in m.graph.initializer if t.name == "Wfc")))


def test_fuse_quantize_eval_bench_through_external_data(low_threshold, tmp_path, capsys):
    qtool.io.save_model(big_model(), tmp_path / "m.onnx")
    inputs = files(tmp_path)
    assert set(inputs) == {"m.onnx", "m.onnx.data"}

    assert main(["fuse", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "f.onnx")]) == 0, capsys.readouterr().err
    assert "Wfc" in external_tensors(tmp_path / "f.onnx")
    from qtool.data import load_dataset
    x = load_dataset("digits", "val").images[:8].astype(np.float32) / 255  # no metadata: pixels / 255
    np.testing.assert_allclose(run(tmp_path / "f.onnx", x), run(tmp_path / "m.onnx", x), rtol=1e-4, atol=1e-5)

    rc = main(["quantize", str(tmp_path / "f.onnx"), "--calib-size", "16", "-o", str(tmp_path / "q.onnx")])
    assert rc == 0, capsys.readouterr().err
    assert external_tensors(tmp_path / "q.onnx")  # the int8 Gemm weight (4 KiB) went external too
    q = onnx.load(str(tmp_path / "q.onnx"))  # loads its .data
    onnx.checker.check_model(q, full_check=True)
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) >= 3
    yq, yf = run(tmp_path / "q.onnx", x), run(tmp_path / "f.onnx", x)
    assert np.abs(yq - yf).max() <= 0.05 * np.abs(yf).max()  # INT8 on calibration-like data: close

    capsys.readouterr()
    assert main(["eval", str(tmp_path / "q.onnx")]) == 0, capsys.readouterr().err
    assert "top-1" in capsys.readouterr().out
    assert main(["bench", str(tmp_path / "q.onnx"), "--runs", "2", "--warmup", "0"]) == 0, capsys.readouterr().err

    after = files(tmp_path)
    assert {k: after[k] for k in inputs} == inputs  # the input model and its data untouched
    assert set(after) == {"m.onnx", "m.onnx.data", "f.onnx", "f.onnx.data", "q.onnx", "q.onnx.data"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files or dirs


# ------------------------------------------------------------------ external data outside the folder

def with_external_location(tmp_path: Path, location: str) -> Path:
    """m.onnx in tmp_path/model/ whose Wfc lives at `location` (relative to model/)."""
    d = tmp_path / "model"
    d.mkdir()
    m = big_model()
    t = next(t for t in m.graph.initializer if t.name == "Wfc")
    raw = t.raw_data or nh.to_array(t).tobytes()
    target = (d / location) if not os.path.isabs(location) else Path(location)
    if not target.parent.exists():
        target.parent.mkdir(parents=True)
    if not target.exists():
        target.write_bytes(raw)
    onnx.external_data_helper.set_external_data(t, location=location, offset=0, length=len(raw))
    t.ClearField("raw_data")
    t.data_location = TP.EXTERNAL
    onnx.save(m, str(d / "m.onnx"))
    return d / "m.onnx"


def escaping(kind: str, tmp_path: Path) -> Path:
    if kind == "parent":
        return with_external_location(tmp_path, "../secret.bin")
    if kind == "absolute":
        return with_external_location(tmp_path, str(tmp_path / "elsewhere" / "abs.bin"))
    if kind == "symlink":  # inside by name, outside once resolved
        (tmp_path / "outside.bin").write_bytes(b"\0" * 4 * NCLASS * 16)
        (tmp_path / "model").mkdir()
        os.symlink(tmp_path / "outside.bin", tmp_path / "model" / "link.bin")
        os.rename(tmp_path / "model", tmp_path / "model_tmp")
        p = with_external_location(tmp_path, "x.bin")  # builds model/ again; then swap in the link
        loaded = onnx.load(str(p), load_external_data=False)
        for t in loaded.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = "link.bin"
        (p.parent / "x.bin").unlink()
        os.rename(tmp_path / "model_tmp" / "link.bin", p.parent / "link.bin")
        (tmp_path / "model_tmp").rmdir()
        onnx.save(loaded, str(p))
        return p
    raise AssertionError(kind)


def _argv(cmd: str, model: Path, out: Path) -> list[str]:
    return {"fuse": ["fuse", str(model), "-o", str(out)],
            "quantize": ["quantize", str(model), "--calib-size", "8", "-o", str(out)],
            "eval": ["eval", str(model)],
            "bench": ["bench", str(model), "--runs", "1", "--warmup", "0"]}[cmd]


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): ("dir" if p.is_dir() and not p.is_symlink() else
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("cmd", ["fuse", "quantize", "eval", "bench"])
@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_external_data_escaping_the_model_dir_is_refused(kind, cmd, tmp_path, capsys):
    model = escaping(kind, tmp_path)
    before = _tree(tmp_path)
    rc = main(_argv(cmd, model, tmp_path / "model" / "out.onnx"))
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "escapes the model's directory" in err and "'Wfc'" in err
    assert _tree(tmp_path) == before


def test_missing_external_data_file(tmp_path, capsys):
    model = with_external_location(tmp_path, "w.bin")
    (model.parent / "w.bin").unlink()
    rc = main(["fuse", str(model), "-o", str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "external data file 'w.bin'" in err and "not found" in err
    assert not (tmp_path / "out.onnx").exists()


def test_truncated_external_data_file(tmp_path, capsys):
    model = with_external_location(tmp_path, "w.bin")
    (model.parent / "w.bin").write_bytes(b"\0" * 10)
    rc = main(["eval", str(model)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(model) in err


# ----------------------------------------------------------------------------------- size limit

@pytest.mark.parametrize("cmd", ["fuse", "quantize", "eval", "bench"])
def test_model_size_limit_counts_external_data(low_threshold, monkeypatch, tmp_path, capsys, cmd):
    qtool.io.save_model(big_model(), tmp_path / "m.onnx")
    onnx_size = (tmp_path / "m.onnx").stat().st_size
    total = onnx_size + (tmp_path / "m.onnx.data").stat().st_size
    before = files(tmp_path)
    # The .onnx file alone is under the limit; with its data it is over.
    monkeypatch.setattr(qtool.io, "MAX_MODEL_BYTES", onnx_size + 100)
    rc = main(_argv(cmd, tmp_path / "m.onnx", tmp_path / "out.onnx"))
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "with its external data, over the" in err and "limit" in err and "m.onnx" in err
    assert files(tmp_path) == before
    # Just over the whole size: the same command gets past the limit.
    monkeypatch.setattr(qtool.io, "MAX_MODEL_BYTES", total)
    assert qtool.io.load_model(tmp_path / "m.onnx").graph.node


def test_model_size_limit_on_the_file_itself(monkeypatch, tmp_path, capsys):
    onnx.save(big_model(), str(tmp_path / "m.onnx"))
    monkeypatch.setattr(qtool.io, "MAX_MODEL_BYTES", 4096)
    rc = main(["fuse", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "f.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "KiB, over the 4.0 KiB limit" in err and "external" not in err
    assert not (tmp_path / "f.onnx").exists()
