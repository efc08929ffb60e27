"""QAT on the ONNX graph: fidelity of the fake-quant model vs onnxruntime on the written QDQ model,
every algorithm end to end, bit policies, BN folding, config validation and the CLI."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qtool.cli import main
from qtool.errors import QtoolError
from qtool.plan import QuantPlan
from qtool.qat_train import QATConfig, qat, resolve_bits
from qtool.qat_config import QuantRule, load_config_list, parse_config_list
from qtool.fusion import fuse

TRAIN_LIMIT = 256  # a few hundred images keep each QAT run around a second on a busy CPU


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lenet_path(lenet, tmp_path_factory):
    p = tmp_path_factory.mktemp("qat") / "lenet.onnx"
    onnx.save(lenet, p)
    return p


def _cfg(**kw):
    base = dict(epochs=1, batch_size=64, train_limit=TRAIN_LIMIT, calib_size=128, quiet=True)
    base.update(kw)
    return QATConfig(**base)


def _ort(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _check_fidelity(r, val):
    """Independent of r.fidelity: run both models here on the whole val split."""
    onnx.checker.check_model(r.model, full_check=True)
    x = val.preprocess.apply(val.images)
    ref = _ort(r.model, x)
    with torch.no_grad():
        y = r.module.eval()(torch.from_numpy(x)).numpy()
    acc_ort = (ref.argmax(1) == val.labels).mean()
    acc_fq = (y.argmax(1) == val.labels).mean()
    assert abs(acc_ort - acc_fq) * 100 <= 0.1
    step = r.plan.tensors["logits"].scale
    # eval mode emulates onnxruntime's integer kernels (qtool.ortexact): the logits are bit-equal,
    # which is stricter than the "within 2 quantization steps"
    assert np.array_equal(y, ref), f"logits differ by {np.abs(y - ref).max() / step:.1f} steps"
    assert r.fidelity["diff_pp"] == 0 and r.fidelity["logit_max_steps"] == 0
    return acc_fq, float(np.abs(y - ref).max() / step)


# ------------------------------------------------------------------------------------------------
# Fidelity and every algorithm
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["minmax", "ema", "lsq", "pact", "dorefa", "bnn"])
def test_every_algorithm_exports_a_faithful_qdq_model(algo, lenet, digits):
    tr, val = digits
    r = qat(lenet, tr, val, _cfg(weight_bits=4, act_bits=4, algo=algo))
    _check_fidelity(r, val)
    ops = Counter(n.op_type for n in r.model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["Clip"] > 0  # 4-bit activations: Q -> Clip(codes) -> DQ
    T = r.plan.tensors
    # First conv and last FC stay at 8 bits (weights and inputs), the rest is 4-bit (BNN: +-1 codes).
    assert T["features.0.weight"].bits == 8 and T["input"].bits == 8 and T["classifier.5.weight"].bits == 8
    assert T["logits"].bits == 8
    assert T["features.4.weight"].bits == (2 if algo == "bnn" else 4)
    assert T["features.4.weight"].granularity == "per_channel" and T["features.4.weight"].axis == 0
    assert r.bn_fold and len(r.history) == 2 and 0 <= r.history[-1]["val_acc"] <= 1
    # The plan is valid for the written model's source graph and round-trips through JSON.
    assert QuantPlan.from_json(r.plan.to_json(), r.fused).tensors == T
    # The exported weights are exactly code * scale: the QDQ insertion recovers the codes losslessly.
    w = numpy_helper.to_array(next(t for t in r.fused.graph.initializer if t.name == "features.4.weight"))
    s = np.asarray(T["features.4.weight"].scale, np.float32).reshape(-1, 1, 1, 1)
    codes = np.rint(w / s)
    lo, hi = T["features.4.weight"].qrange
    assert np.array_equal((codes * s).astype(np.float32), w) and codes.min() >= lo and codes.max() <= hi


def test_w8a8_lsq_fidelity_and_accuracy(lenet, digits):
    tr, val = digits
    r = qat(lenet, tr, val, _cfg(algo="lsq", epochs=2))
    acc, steps = _check_fidelity(r, val)
    assert acc > 0.85  # a trained LeNet stays accurate at 8 bits
    assert [h["epoch"] for h in r.history] == [0, 1, 2]


def test_fused_graph_training_without_bn_fold(lenet, digits):
    tr, val = digits
    r = qat(lenet, tr, val, _cfg(weight_bits=4, act_bits=4, bn="fold"))
    assert not r.bn_fold
    _check_fidelity(r, val)
    # Node names of the fused graph are kept; the tuned weights are in it.
    fused, _ = fuse(lenet)
    assert [n.name for n in r.fused.graph.node] == [n.name for n in fused.graph.node]


def test_bn_fold_freezes_statistics_and_matches_folded_conv(lenet, digits):
    tr, val = digits
    r = qat(lenet, tr, val, _cfg(weight_bits=4, act_bits=4, freeze_bn=2, quant_delay=1))
    assert r.bn_fold and any("frozen after step 2" in n for n in r.notes)
    _check_fidelity(r, val)
    # BN statistics moved during the first (unfrozen) steps of training.
    before = {t.name: numpy_helper.to_array(t) for t in lenet.graph.initializer}
    after = r.module.export_weights()
    assert not np.array_equal(before["features.1.running_mean"], after["features.1.running_mean"])


def test_mixed_precision_rules_start_step_and_exclude(lenet, digits, tmp_path):
    tr, val = digits
    cfg_file = tmp_path / "qat.yml"
    cfg_file.write_text(
        "- op_types: [Conv2d]\n  quant_types: [weight]\n  quant_bits: 3\n"
        "- op_names: [classifier.1]\n  quant_types: [weight, input]\n  quant_bits: {weight: 2, input: 6}\n"
        "  quant_start_step: 2\n"
        "- op_names: [classifier.3]\n  quant_types: [weight, input]\n  exclude: true\n")
    rules = load_config_list(cfg_file)
    r = qat(lenet, tr, val, _cfg(rules=rules, first_last_bits=None, algo="lsq"))
    T = r.plan.tensors
    assert T["features.0.weight"].bits == 3 and T["features.4.weight"].bits == 3
    assert T["classifier.1.weight"].bits == 2
    assert r.module.quantizer("classifier.1.weight").quant_delay == 2  # quant_start_step
    assert r.module.quantizer("features.4.weight") is None  # BN-folded: quantized inside the Conv+BN module
    # classifier.1 reads the Flatten output, which shares the MaxPool output's parameters: both 6-bit.
    assert T["/classifier/classifier.0/Flatten_output_0"].bits == 6
    assert T["/features/features.7/MaxPool_output_0"].bits == 6
    assert "classifier.3.weight" not in T  # excluded: stays float in the QDQ model
    assert "/classifier/classifier.2/Relu_output_0" not in T
    assert "classifier.3.weight" in {t.name for t in r.model.graph.initializer}
    _check_fidelity(r, val)


def test_plan_bits_reused(lenet, digits):
    tr, val = digits
    fused, _ = fuse(lenet)
    spec = resolve_bits(fused, QATConfig(weight_bits=5, act_bits=7, first_last_bits=None))
    plan_bits = tuple((k, s.bits) for k, s in spec.items())
    r = qat(lenet, tr, val, _cfg(plan_bits=plan_bits, algo="ema"))
    assert {k: t.bits for k, t in r.plan.tensors.items()} == dict(plan_bits)
    _check_fidelity(r, val)


def _conv_bn_model(act: str = "Relu"):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node(act, ["n"], ["r"], name="act"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "F", "B"], ["logits"], name="fc", transB=1)]
    inits = {"W": rng.normal(size=(8, 3, 3, 3)) * 0.3, "g": rng.uniform(0.5, 1.5, 8), "b": rng.normal(size=8) * 0.1,
             "m": rng.normal(size=8) * 0.1, "v": rng.uniform(0.5, 2, 8), "F": rng.normal(size=(4, 8)),
             "B": rng.normal(size=4) * 0.1}
    g = helper.make_graph(nodes, "convbn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.metadata_props.add(key="qtool.preprocess", value='{"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}')
    return m


def test_tiny_rgb_model_with_augmentation_and_adam():
    from qtool.data import ImageDataset
    from qtool.preprocess import Preprocess

    rng = np.random.default_rng(1)
    ds = ImageDataset(rng.integers(0, 256, (96, 3, 16, 16), dtype=np.uint8), rng.integers(0, 4, 96),
                      tuple("abcd"), Preprocess(mean=(0.5,) * 3, std=(0.25,) * 3))
    r = qat(_conv_bn_model(), ds, ds.subset(np.arange(48)), _cfg(weight_bits=3, act_bits=5, optimizer="adam",
                                                                  first_last_bits=None, freeze_bn=1))
    assert r.bn_fold
    x = ds.preprocess.apply(ds.images[:48])
    with torch.no_grad():
        y = r.module(torch.from_numpy(x)).numpy()
    assert np.abs(y - _ort(r.model, x)).max() <= 2 * r.plan.tensors["logits"].scale + 1e-6


@pytest.mark.parametrize("act", ["LeakyRelu", "Sigmoid", "HardSwish"])
def test_activation_outside_the_unit_is_faithful_and_integer(act):
    """Conv -> act that a Q cannot absorb: the Conv's output gets its own fake-quant, mirrored by a Q/DQ in
    the export, so the fake-quant model still matches ORT and the Conv runs as QLinearConv."""
    from qtool.data import ImageDataset
    from qtool.ortgraph import integer_kernel_report
    from qtool.preprocess import Preprocess

    rng = np.random.default_rng(2)
    ds = ImageDataset(rng.integers(0, 256, (96, 3, 16, 16), dtype=np.uint8), rng.integers(0, 4, 96),
                      tuple("abcd"), Preprocess(mean=(0.5,) * 3, std=(0.25,) * 3))
    r = qat(_conv_bn_model(act), ds, ds.subset(np.arange(48)), _cfg(first_last_bits=None))
    x = ds.preprocess.apply(ds.images[:48])
    with torch.no_grad():
        y = r.module.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(y - _ort(r.model, x)).max() <= 2 * r.plan.tensors["logits"].scale + 1e-6
    rep = integer_kernel_report(r.model)
    assert (rep.integer_compute, rep.float_compute, rep.float_fallbacks) == (2, 0, 0)  # QLinearConv + QGemm


# ------------------------------------------------------------------------------------------------
# Config validation: one line, names the problem
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(weight_bits=9), "weight_bits must be an integer in 2..8"),
    (dict(act_bits=1), "act_bits must be an integer in 2..8"),
    (dict(first_last_bits=0), "first_last_bits"),
    (dict(algo="xnor"), "algo must be one of"),
    (dict(optimizer="rmsprop"), "optimizer must be one of"),
    (dict(epochs=0), "epochs must be an integer >= 1"),
    (dict(lr=0.0), "lr must be a number"),
    (dict(momentum=1.5), "momentum must be in [0, 1)"),
    (dict(train_limit=0), "train_limit"),
    (dict(device="tpu"), "device must be cpu or cuda"),
    (dict(plan_bits=(("a", 4),), rules=(QuantRule(op_types=("Conv",)),)), "either as a plan or as a config"),
    (dict(plan_bits=(("a", 12),)), "plan bits of 'a'"),
    (dict(bn="renorm"), "bn must be one of unfold, fold for qat"),  # the supernet's strategy, not qat's
    (dict(bn=True), "bn must be one of"),
])
def test_bad_config(kw, msg):
    with pytest.raises(QtoolError) as ei:
        QATConfig(**kw)
    assert msg in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("data,msg", [
    ([{"op_types": ["Conv"], "quant_bit": 4}], "config rule 0: unknown key 'quant_bit'"),
    ([{"op_types": ["Conv"], "quant_bits": 9}], "config rule 0: quant_bits must be an integer in 2..8"),
    ([{"op_types": ["Conv"], "quant_bits": {"weight": 1}}], "quant_bits[weight] must be an integer in 2..8"),
    ([{"op_types": ["Conv"], "quant_bits": {"bias": 4}}], "quant_bits key must be weight, input or output"),
    ([{"op_types": ["Conv"], "quant_types": ["activation"]}], "quant_types entries must be weight, input or output"),
    ([{"op_types": ["Conv"], "quant_start_step": -1}], "quant_start_step must be an integer >= 0"),
    ([{"quant_bits": 4}], "needs op_types or op_names"),
    ([{"op_types": "Conv", "exclude": "yes"}], "exclude must be true or false"),
    ([], "non-empty list"),
    ({"rules": []}, "unknown top-level key 'rules'"),
    (["Conv"], "config rule 0: expected a mapping"),
])
def test_bad_config_list(data, msg):
    with pytest.raises(QtoolError) as ei:
        parse_config_list(data)
    assert msg in str(ei.value) and "\n" not in str(ei.value)


def test_rules_checked_against_the_graph(lenet):
    fused, _ = fuse(lenet)
    with pytest.raises(QtoolError, match="op name 'layers.9.conv' is not in the graph"):
        resolve_bits(fused, QATConfig(rules=parse_config_list([{"op_names": ["layers.9.conv"], "quant_bits": 4}])))
    with pytest.raises(QtoolError, match="op type 'LSTM' is not a quantized op"):
        resolve_bits(fused, QATConfig(rules=parse_config_list([{"op_types": ["LSTM"], "quant_bits": 4}])))
    with pytest.raises(QtoolError, match="weight 'classifier.3.weight' of Gemm .* is left float while its input"):
        resolve_bits(fused, QATConfig(rules=parse_config_list([
            {"op_names": ["classifier.3"], "quant_types": ["weight"], "exclude": True}])))
    with pytest.raises(QtoolError, match="plan tensor 'nope' is not a quantization point"):
        resolve_bits(fused, QATConfig(plan_bits=(("nope", 4),)))
    # Node names and weight names both select a node; `default` means every weight layer.
    spec = resolve_bits(fused, QATConfig(rules=parse_config_list([
        {"op_types": ["default"], "quant_types": ["weight"], "quant_bits": 4},
        {"op_names": ["/features/features.0/Conv"], "quant_types": ["weight"], "quant_bits": 6}])))
    assert spec["features.0.weight"].bits == 6 and spec["classifier.3.weight"].bits == 4
    assert spec["input"].bits == 8  # first-layer policy; rules only change what they name


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,yaml_text,msg", [
    (["--config", "{cfg}"], "- op_types: [Conv]\n  quant_bitz: 4\n", "unknown key 'quant_bitz'"),
    (["--config", "{cfg}"], "- op_types: [Conv]\n  quant_bits: 16\n", "quant_bits must be an integer in 2..8"),
    (["--config", "{cfg}"], "- op_names: [nope]\n  quant_bits: 4\n", "op name 'nope' is not in the graph"),
    (["--config", "{cfg}"], "- op_types: [Conv\n", "is not valid YAML"),
    (["--config", "{missing}"], None, "QAT config file not found"),
    (["--bits", "w4a4", "--config", "{cfg}"], "- op_types: [Conv]\n", "only one of --bits, --plan and --config"),
    (["--bits", "w9a4"], None, "weight bits must be in 2..8"),
    (["--epochs", "0"], None, "epochs must be an integer >= 1"),
])
def test_cli_bad_input_exits_2(args, yaml_text, msg, lenet_path, tmp_path, capsys):
    cfg = tmp_path / "qat.yml"
    if yaml_text is not None:
        cfg.write_text(yaml_text)
    out = tmp_path / "out.onnx"
    args = [a.format(cfg=cfg, missing=tmp_path / "none.yml") for a in args]
    rc = main(["qat", str(lenet_path), "--data", "digits", "--train-limit", "64", "-o", str(out)] + args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_cli_writes_model_and_plan(lenet_path, tmp_path, capsys):
    out, plan_out = tmp_path / "q.onnx", tmp_path / "plan.json"
    rc = main(["qat", str(lenet_path), "--data", "digits", "--bits", "w4a4", "--algo", "pact", "--train-limit",
               str(TRAIN_LIMIT), "--batch-size", "64", "--lr", "0.005", "-o", str(out), "--plan-out", str(plan_out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "epoch 1: val acc (fake-quant)" in text and "onnxruntime" in text and "difference" in text
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    plan = json.loads(plan_out.read_text())
    assert plan["meta"]["producer"] == "qtool.qat" and plan["meta"]["algo"] == "pact"
    # The written plan drives another run (per-tensor bits from --plan).
    out2 = tmp_path / "q2.onnx"
    rc = main(["qat", str(lenet_path), "--data", "digits", "--plan", str(plan_out), "--algo", "ema",
               "--train-limit", "64", "-o", str(out2)])
    assert rc == 0 and out2.exists()


@pytest.mark.parametrize("bn", ["unfold", "fold"])
def test_plan_is_read_off_the_lifted_modules_slots(bn, lenet, digits):
    """QATModel.to_plan is LiftedModule.to_plan of the slots (a Conv->BN fold declares its weight's
    quantizer to replace_nodes): exactly the entries of the bit specification's quantizers, excluded
    tensors left out."""
    from qtool.preprocess import resolve_preprocess
    from qtool.qat_model import build_qat_model
    from qtool.quant_slots import plan_of

    rules = parse_config_list([{"op_names": ["classifier.3"], "quant_types": ["weight", "input"], "exclude": True}])
    qm = build_qat_model(lenet, digits[0], _cfg(weight_bits=4, act_bits=4, bn=bn, rules=rules), resolve_preprocess(lenet),
                         torch.device("cpu"), [])
    assert bool(qm.pairs) == (bn == "unfold")
    _, plan = qm.to_plan({"producer": "test"})
    expected = plan_of({t: (s.kind, qm.quantizers[t]) for t, s in qm.spec.items()}, {"producer": "test"})
    assert {t: q.to_dict() for t, q in plan.tensors.items()} == {t: q.to_dict() for t, q in expected.tensors.items()}
    assert plan.meta == expected.meta
    assert "classifier.3.weight" not in plan.tensors and "features.4.weight" in plan.tensors
