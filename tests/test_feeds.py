"""Data as feeds (qtool.feeds) and label-free evaluation (eval --against): models with several inputs,
int64 token ids and symbolic dims are fed from an npz of named arrays; images:DIR resizes any image
files; mismatches are exit 2 naming the input."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from PIL import Image

import qtool
from qtool.cli import main
from qtool.evaluation import compare_outputs
from qtool.feeds import calibration_feeds, feeds_for

RNG = np.random.default_rng(0)


def text_model() -> onnx.ModelProto:
    """A BERT-shaped toy: int64 token ids + a float mask -> embedding Gather -> MatMul -> masked mean -> Gemm."""
    emb = RNG.normal(0, 1, (50, 16)).astype(np.float32)
    nodes = [h.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
             h.make_node("MatMul", ["e", "w"], ["hdn"], name="proj"),
             h.make_node("Relu", ["hdn"], ["r"], name="act"),
             h.make_node("Unsqueeze", ["mask", "axes"], ["m3"], name="unsq"),
             h.make_node("Mul", ["r", "m3"], ["rm"], name="apply_mask"),
             h.make_node("ReduceMean", ["rm"], ["pooled"], axes=[1], keepdims=0, name="pool"),
             h.make_node("Gemm", ["pooled", "wc", "bc"], ["logits"], transB=1, name="cls")]
    inits = [nh.from_array(emb, "emb"), nh.from_array(RNG.normal(0, .3, (16, 32)).astype(np.float32), "w"),
             nh.from_array(np.array([2], np.int64), "axes"),
             nh.from_array(RNG.normal(0, .3, (3, 32)).astype(np.float32), "wc"), nh.from_array(np.zeros(3, np.float32), "bc")]
    g = h.make_graph(nodes, "text", [h.make_tensor_value_info("ids", T.INT64, ["batch", "seq"]),
                                     h.make_tensor_value_info("mask", T.FLOAT, ["batch", "seq"])],
                     [h.make_tensor_value_info("logits", T.FLOAT, ["batch", 3])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def text_npz(path, n=40, seq=12, labels=True, **override):
    arrays = {"ids": RNG.integers(0, 50, (n, seq)).astype(np.int64), "mask": np.ones((n, seq), np.float32)}
    if labels:
        arrays["labels"] = RNG.integers(0, 3, n).astype(np.int64)
    arrays.update(override)
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_a_two_input_int64_model_quantizes_and_evaluates_from_named_arrays(tmp_path, capsys):
    src = tmp_path / "text.onnx"
    onnx.save(text_model(), src)
    spec = text_npz(tmp_path / "d.npz")
    assert main(["quantize", str(src), "--data", spec, "-o", str(tmp_path / "q.onnx"), "--report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "SQNR" in out and "quantization error per tensor" in out
    q = onnx.load(tmp_path / "q.onnx")
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) >= 2
    assert main(["eval", str(tmp_path / "q.onnx"), "--data", spec, "--against", str(src)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("logits: SQNR") and "top-1 agreement" in line
    sqnr = float(line.split("SQNR ")[1].split(" dB")[0])
    assert sqnr > 15  # W8A8 of a tiny MLP stays close to FP32


def test_label_free_metrics_come_back_from_the_api(tmp_path):
    fp32 = text_model()
    spec = text_npz(tmp_path / "d.npz", labels=False)
    q = qtool.quantize(fp32, spec, qtool.QuantConfig())
    r = qtool.evaluate(q.model, spec, against=fp32)
    assert r.accuracy is None and r.n == 40
    m = r.outputs["logits"]
    assert m.sqnr_db > 15 and m.cosine > 0.99 and 0 < m.max_abs and m.top1_agreement is not None
    same = qtool.evaluate(fp32, spec, against=fp32).outputs["logits"]
    assert same.sqnr_db == float("inf") and same.max_abs == 0 and same.top1_agreement == 1.0


def test_compare_outputs_flags_collapse():
    ref = RNG.normal(0, 1, (8, 5))
    assert compare_outputs(ref, np.zeros_like(ref)).collapsed == "constant"
    assert compare_outputs(ref, np.full_like(ref, np.nan)).collapsed == "nan"
    noisy = compare_outputs(ref, ref + RNG.normal(0, 0.1, ref.shape))
    assert noisy.collapsed is None and 15 < noisy.sqnr_db < 25


@pytest.mark.parametrize("override, expect", [
    (dict(ids=np.zeros((40, 12), np.int32)), "input 'ids' is int32 but the model expects int64"),
    (dict(mask=np.ones((40, 12, 1), np.float32)), "input 'mask' has rank 3"),
    (dict(extra=np.zeros(40)), "arrays ['extra'] match no model input"),
    (dict(mask=np.ones((39, 12), np.float32)), "inputs hold different numbers of samples"),
])
def test_mismatched_named_arrays_are_exit_2_naming_the_input(tmp_path, capsys, override, expect):
    src = tmp_path / "text.onnx"
    onnx.save(text_model(), src)
    spec = text_npz(tmp_path / "d.npz", **override)
    assert main(["quantize", str(src), "--data", spec, "-o", str(tmp_path / "q.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert not (tmp_path / "q.onnx").exists()


def test_a_missing_input_array_is_named(tmp_path, capsys):
    src = tmp_path / "text.onnx"
    onnx.save(text_model(), src)
    np.savez(tmp_path / "d.npz", ids=RNG.integers(0, 50, (4, 6)).astype(np.int64))
    assert main(["eval", str(src), "--data", f"npz:{tmp_path / 'd.npz'}"]) == 2
    assert "has no array for model input 'mask'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_mean_std_with_named_arrays_is_exit_2_not_silently_unused(tmp_path, capsys, command):
    src = tmp_path / "text.onnx"
    onnx.save(text_model(), src)
    spec = text_npz(tmp_path / "d.npz")
    out = ["-o", str(tmp_path / "q.onnx")] if command == "quantize" else []
    assert main([command, str(src), "--data", spec, "--mean", "0.5", "--std", "0.25", *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mean/--std normalize image data" in err[0]
    assert not (tmp_path / "q.onnx").exists()
    assert main([command, str(src), "--data", spec, *out]) == 0  # without them the same data feeds the model


def test_a_text_model_without_data_asks_for_it(tmp_path, capsys):
    src = tmp_path / "text.onnx"
    onnx.save(text_model(), src)
    assert main(["quantize", str(src), "-o", str(tmp_path / "q.onnx")]) == 2
    err = capsys.readouterr().err
    assert "ids int64 [?, ?]" in err and "give the model's own data (--data SPEC)" in err


def image_model(symbolic_hw: bool) -> onnx.ModelProto:
    hw = ["h", "w"] if symbolic_hw else [24, 24]
    nodes = [h.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             h.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"), h.make_node("Flatten", ["p"], ["y"], name="flat")]
    inits = [nh.from_array(RNG.normal(0, .3, (4, 3, 3, 3)).astype(np.float32), "w"), nh.from_array(np.zeros(4, np.float32), "b")]
    g = h.make_graph(nodes, "img", [h.make_tensor_value_info("x", T.FLOAT, [None, 3] + hw)],
                     [h.make_tensor_value_info("y", T.FLOAT, [None, 4])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _image_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, size in enumerate([(40, 30), (24, 24), (100, 50)]):
        Image.fromarray(RNG.integers(0, 255, (size[1], size[0], 3)).astype(np.uint8)).save(d / f"{i}.png")
    (d / "notes.txt").write_text("not an image")
    return d


def test_images_dir_is_resized_and_center_cropped_to_the_model_input(tmp_path):
    d = _image_dir(tmp_path)
    fs = feeds_for(image_model(False), f"images:{d}")
    assert fs.arrays["x"].shape == (3, 3, 24, 24) and fs.arrays["x"].dtype == np.float32 and fs.labels is None
    with pytest.raises(qtool.QtoolError, match="--input-shape x:1x3xHxW"):
        feeds_for(image_model(True), f"images:{d}")
    fs = feeds_for(image_model(True), f"images:{d}", input_shapes={"x": (1, 3, 16, 20)})
    assert fs.arrays["x"].shape == (3, 3, 16, 20)
    # images are normalized by --mean/--std (named npz arrays refuse them), for calibration too
    plain = feeds_for(image_model(False), f"images:{d}").arrays["x"]
    norm = qtool.Data(f"images:{d}", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    np.testing.assert_allclose(feeds_for(image_model(False), norm).arrays["x"], (plain - 0.5) / 0.25, atol=1e-5)
    calib = next(iter(calibration_feeds(image_model(False), norm, 3)))["x"]
    np.testing.assert_allclose(calib, (plain - 0.5) / 0.25, atol=1e-5)


def test_input_shape_on_the_cli(tmp_path, capsys):
    d = _image_dir(tmp_path)
    src = tmp_path / "m.onnx"
    onnx.save(image_model(True), src)
    argv = ["quantize", str(src), "--data", f"images:{d}", "-o", str(tmp_path / "q.onnx")]
    assert main(argv) == 2 and "--input-shape" in capsys.readouterr().err
    assert main(argv + ["--input-shape", "x:1x3x32x32"]) == 0
    assert main(argv + ["--input-shape", "x:1x3x32"]) == 2
    assert "rank 3" in capsys.readouterr().err
    assert main(argv + ["--input-shape", "nope"]) == 2
    assert "NAME:1x3x640x640" in capsys.readouterr().err


def test_float_npz_images_are_not_rounded_into_pixels(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(image_model(False), src)
    np.savez(tmp_path / "d.npz", x=RNG.normal(0, 1, (10, 3, 24, 24)).astype(np.float64), y=np.zeros(10, np.int64))
    assert main(["quantize", str(src), "--data", f"npz:{tmp_path / 'd.npz'}", "-o", str(tmp_path / "q.onnx")]) == 2
    assert "neither pixels/255 in [0, 1] nor 0..255 pixels" in capsys.readouterr().err
