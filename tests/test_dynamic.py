"""DQNet dynamic bit-widths: controller choices, the budget penalty, ORT routing == PyTorch, the runtime's
grouping / scattering, and the CLI's bad-input exits. LeNet-5 on a few hundred digits images."""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from qtool.cli import main
from qtool.errors import QtoolError
from qtool.dynbits import DynamicConfig, DynamicNet, DynamicSession, write_deployment
from qtool.dynbits.controller import max_onehot
from qtool.dynbits.routing import correctness
from qtool.dynbits.train import _calibrate, _expected_step, evaluate, train, uniform_bitflops
from qtool.lift import lift
from qtool.fusion import fuse
from qtool.bitsearch.space import SearchSpace

TRAIN_LIMIT = 256
BITS = (3, 4, 5)


pytestmark = pytest.mark.usefixtures("one_thread")


def _net(lenet, digits, **kw):
    tr, _ = digits
    fused = fuse(lenet)[0]
    space = SearchSpace.from_model(fused, BITS, fix_first=8, fix_last=None)
    torch.manual_seed(0)
    return DynamicNet(fused, BITS, _calibrate(fused, space, tr, tr.preprocess, 128), **kw)


@pytest.fixture(scope="module")
def base_net(lenet, digits):
    return _net(lenet, digits)


@pytest.fixture(scope="module")
def conv_net(lenet, digits):
    """A controller with its own 3x3 conv before the pooling (--controller-conv)."""
    return _net(lenet, digits, controller_conv=8)


@pytest.fixture(scope="module")
def deep_net(lenet, digits):
    """The controller reads the input of layer 2 (--controller-layers 2): conv1 at 8 bits, conv2 static at 4."""
    return _net(lenet, digits, controller_layers=2)


@pytest.fixture(scope="module")
def global_net(lenet, digits):
    """One bit-width per image for every dynamic layer (--granularity global)."""
    return _net(lenet, digits, granularity="global")


def test_global_granularity_draws_one_bit_width_per_image(global_net, digits):
    net = copy.deepcopy(global_net)
    tr, _ = digits
    x = torch.from_numpy(tr.preprocess.apply(tr.images[:64]))
    net.train()
    net.set_mode("gumbel")
    net(x)
    g = net.last_choice
    assert torch.equal(g, g[:, :1].expand_as(g))  # the same one-hot in every layer
    assert len(set(g[:, 0].argmax(-1).tolist())) == len(BITS)  # zero logits: the draws still vary over images
    assert net.controller.fc2.out_features == len(BITS)
    w, b = net.controller.fc2_per_layer()
    assert w.shape == (net.n_dynamic * len(BITS), net.controller.fc1.out_features) and b.shape == (w.shape[0],)
    with pytest.raises(QtoolError, match="--granularity"):
        DynamicConfig(granularity="block")


def test_expected_estimator_averages_each_images_loss_under_the_controller(global_net, digits):
    """estimator "expected": loss = mean_i sum_k p_k(i) CE_k(i) over the K uniform configurations, cost =
    p @ their BitFLOPs, checked against the configurations run one by one; the net ends in gumbel mode."""
    net = copy.deepcopy(global_net)
    tr, _ = digits
    x = torch.from_numpy(tr.preprocess.apply(tr.images[:32]))
    y = torch.from_numpy(tr.labels[:32])
    with torch.no_grad():
        torch.manual_seed(5)
        net.controller.fc2.weight.normal_(0, 1.0)
    net.eval()  # no dropout: the same logits in every pass
    costs = torch.tensor([net.config_bitflops(net.uniform(b)) for b in BITS])
    logits, loss, bf, mean_bits = _expected_step(net, x, y, None, 0.0, costs)
    assert net.mode == "gumbel"
    ce, p = [], None
    for b in BITS:
        net.set_mode("scored", fixed=net.uniform(b))
        out = net(x)
        p = torch.softmax(net.last_logits[:, 0], 1)
        ce.append(torch.nn.functional.cross_entropy(out, y, reduction="none"))
    ce = torch.stack(ce, 1)
    assert loss.item() == pytest.approx((p * ce).sum(1).mean().item(), rel=1e-6)
    assert torch.allclose(bf, p @ costs) and torch.allclose(mean_bits, p @ torch.tensor(BITS, dtype=torch.float32))
    assert 0 < p.max(1).values.min() < 1 and len(set(p.argmax(1).tolist())) >= 2  # the check really mixes
    with pytest.raises(QtoolError, match="--granularity global"):
        DynamicConfig(estimator="expected")


def test_controller_layers_make_the_layers_before_the_tap_static(base_net, deep_net):
    assert [l.dynamic is None for l in deep_net.layers] == [True, True, False, False, False]
    assert [l.bits for l in deep_net.layers[:2]] == [8, 4]  # the stem at 8, the others at the middle choice
    assert deep_net.tap == deep_net.layers[2].input_root != base_net.tap
    assert deep_net.config_bits(deep_net.uniform(3)) == [8, 4, 3, 3, 3]
    # conv2 (static 4 x 4) costs 16 per MAC, where it costs 3 x 3 in base_net's uniform-3 configuration
    conv2 = deep_net.layers[1].macs
    assert deep_net.config_bitflops(deep_net.uniform(3)) - base_net.config_bitflops(base_net.uniform(3)) == \
        pytest.approx(conv2 * (16 - 9))
    with pytest.raises(QtoolError, match="--controller-layers"):
        DynamicNet(base_net.fused, BITS, {}, controller_layers=5)


def test_controller_outputs_valid_one_hots(base_net, digits):
    net = copy.deepcopy(base_net)
    tr, _ = digits
    x = torch.from_numpy(tr.preprocess.apply(tr.images[:32]))
    for training, mode in ((True, "gumbel"), (False, "argmax")):
        net.train(training)
        net.set_mode(mode)
        net(x)
        g = net.last_choice
        assert g.shape == (32, net.n_dynamic, len(BITS))
        assert torch.all((g == 0) | (g == 1)) and torch.all(g.sum(-1) == 1)
        for r, ga in net.last_groups.items():
            assert torch.all(ga.sum(-1) == 1)
    assert net.n_dynamic == len(net.layers) - 1  # the stem is static: the controller reads its output
    # max_onehot == one-hot of the max index, for random hard one-hots
    rng = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 3, (50,), generator=rng), torch.randint(0, 3, (50,), generator=rng)
    oh = torch.nn.functional.one_hot
    assert torch.equal(max_onehot([oh(a, 3).float(), oh(b, 3).float()]), oh(torch.maximum(a, b), 3).float())


def test_penalty_pushes_bits_down(base_net, digits):
    tr, _ = digits
    cfg = DynamicConfig(bits=BITS, alpha=2.0, epochs=2, batch_size=64, train_limit=TRAIN_LIMIT, controller_lr=0.02,
                        quiet=True)
    avg = {}
    for b in (3, 5):
        net = copy.deepcopy(base_net)
        net.set_mode("gumbel")
        target = uniform_bitflops(net, b)
        hist = train(net, tr, tr.preprocess, cfg, target, "t", seed=0)
        net.set_mode("argmax")
        avg[b] = (hist[-1]["train_avg_bitflops"], float(evaluate(net, tr.subset(np.arange(256)), tr.preprocess)
                                                        .bitflops.mean()))
    assert avg[3][0] < avg[5][0] and avg[3][1] < avg[5][1], avg
    assert avg[3][1] < uniform_bitflops(base_net, 4) - 0.1 * (uniform_bitflops(base_net, 4) - uniform_bitflops(base_net, 3))


def test_distill_weight_one_learns_from_the_teacher_only(base_net, digits):
    """distill=1: the loss is the teacher's soft labels alone, so scrambled labels train the very same
    weights; distill=0 (labels only) does not."""
    tr, _ = digits
    scrambled = tr.subset(np.arange(len(tr)))
    scrambled.labels[:] = np.roll(tr.labels, 1)
    teacher = lift(base_net.fused)
    out = {}
    for d in (1.0, 0.0):
        cfg = DynamicConfig(bits=BITS, epochs=1, batch_size=64, train_limit=128, distill=d, quiet=True)
        for name, ds in (("labels", tr), ("scrambled", scrambled)):
            net = copy.deepcopy(base_net)
            net.set_mode("fixed", fixed=net.uniform(4))
            train(net, ds, tr.preprocess, cfg, uniform_bitflops(net, 4), "t", seed=0, teacher=teacher)
            out[d, name] = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert torch.equal(out[1.0, "labels"], out[1.0, "scrambled"])
    assert not torch.equal(out[0.0, "labels"], out[0.0, "scrambled"])
    assert not torch.equal(out[1.0, "labels"], out[0.0, "labels"])


@pytest.mark.parametrize("which", ["base_net", "conv_net", "deep_net", "global_net"])
def test_ort_routing_matches_torch_with_several_configs(which, digits, tmp_path, request):
    """A controller with random weights spreads the val images over several configurations; the routed
    onnxruntime deployment must pick the same configuration and prediction per sample (also with the
    controller's own conv, which controller.onnx must compute as the module does)."""
    tr, va = digits
    net = copy.deepcopy(request.getfixturevalue(which))
    assert (net.controller.conv is not None) == (which == "conv_net")
    with torch.no_grad():
        torch.manual_seed(3)
        net.controller.fc2.weight.normal_(0, 2.0)
        if net.controller.conv is not None:
            net.controller.conv.weight.normal_(0, 1.0)
        if net.controller.shared:  # K logits for all layers: centre them over the images so the argmax varies
            net.eval()
            net.set_mode("argmax")
            net(torch.from_numpy(tr.preprocess.apply(va.images)))
            net.controller.fc2.bias.sub_(net.last_logits[:, 0].mean(0))
    k = len(BITS)
    codebook = np.array([[0] * net.n_dynamic, [k - 1] * net.n_dynamic, [1] * net.n_dynamic,
                         [i % k for i in range(net.n_dynamic)]])
    net.set_mode("codebook", codebook=codebook)
    ev = evaluate(net, va, tr.preprocess)
    write_deployment(net, codebook, tmp_path)
    sess = DynamicSession.load(tmp_path, threads=1)
    out = sess.run(tr.preprocess.apply(va.images))
    cfg_torch = np.array([[tuple(c) for c in codebook.tolist()].index(tuple(c)) for c in ev.configs.tolist()])
    assert len(np.unique(cfg_torch)) >= 2  # the test really routes
    assert (sess.last_configs == cfg_torch).mean() >= 0.99
    acc_ort = float((out.argmax(1) == va.labels).mean())
    assert abs(acc_ort - ev.acc) * 100 <= 0.2, (acc_ort, ev.acc)
    # every image through every configuration: the routed ones give back the deployed accuracy
    corr = correctness(sess, tr.preprocess.apply(va.images), va.labels, batch=64)
    assert corr.shape == (len(codebook), len(va))
    assert corr[sess.last_configs, np.arange(len(va))].mean() == acc_ort
    assert (out.argmax(1) == ev.logits.argmax(1)).mean() >= 0.99


def test_runtime_groups_and_scatters_in_order():
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    ctl = helper.make_model(helper.make_graph(
        [helper.make_node("ArgMax", ["x"], ["config"], axis=1, keepdims=0)], "ctl",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("config", TensorProto.INT64, ["N"])]), opset_imports=[helper.make_opsetid("", 17)])

    def add(c):
        return helper.make_model(helper.make_graph(
            [helper.make_node("Add", ["x", "c"], ["y"])], f"m{c}",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
            [helper.make_tensor("c", TensorProto.FLOAT, [], [100.0 * c])]), opset_imports=[helper.make_opsetid("", 17)])

    sess = DynamicSession(ctl, [add(c) for c in range(3)], threads=1)
    y = sess.run(x)
    np.testing.assert_array_equal(sess.last_configs, x.argmax(1))
    np.testing.assert_allclose(y, x + 100.0 * x.argmax(1)[:, None], rtol=0, atol=1e-4)
    assert sess.run(x[:1]).shape == (1, 3)


@pytest.fixture(scope="module")
def cli_run(lenet, tmp_path_factory):
    d = tmp_path_factory.mktemp("dyn")
    onnx.save(lenet, str(d / "lenet.onnx"))
    rc = main([str(x) for x in ("dynamic", d / "lenet.onnx", "--data", "digits", "--bits", "3,4,5",
                                "--target-bitflops", "u4", "--epochs", "1", "--train-limit", TRAIN_LIMIT,
                                "-o", d / "out")])
    return rc, d / "out"


def test_cli_end_to_end(cli_run):
    rc, out = cli_run
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    d = r["dynamic"]
    assert abs(d["ort_minus_torch_pp"]) <= 0.2 and d["config_agreement"] >= 0.99
    assert r["static"] and r["static"][0]["name"] == "matched" and r["acc_diff_pp"] is not None
    assert set(r["uniform_bitflops"]) == {"3", "4", "5"}
    assert 0 < d["acc_torch_shared_at_matched"] <= 1
    # the routing analysis replays the deployment on onnxruntime: the same accuracy and BitFLOPs
    ro = r["routing"]
    assert ro["deployed"]["acc"] == d["acc_ort"] and ro["images"] == r["val_images"]
    assert ro["deployed"]["avg_bitflops"] == pytest.approx(d["avg_bitflops"], rel=1e-2)
    assert ro["oracle"]["acc"] >= max(ro["deployed"]["acc"], (ro["best_single"] or {"acc": 0})["acc"])
    assert ro["oracle"]["avg_bitflops"] <= ro["deployed"]["avg_bitflops"] * (1 + 1e-9)
    for f in ("bitflops_hist.png", "easy_hard.png", "acc_vs_bitflops.png", "controller.onnx", "static.onnx",
              "manifest.json"):
        assert (out / f).stat().st_size > 0
    onnx.checker.check_model(onnx.load(str(out / "controller.onnx")), full_check=True)
    assert {"batch1", "batch64"} <= set(r["latency"])


@pytest.mark.parametrize("args, msg", [
    (["--bits", "3,x"], "--bits"), (["--bits", "4"], "--bits"), (["--bits", "1,4"], "--bits"),
    (["--device", "tpu"], "device must be cpu or cuda"), (["--controller-conv", "-1"], "--controller-conv"),
    (["--distill", "1.5"], "--distill"), (["--distill", "-0.1"], "--distill"),
    (["--controller-layers", "0"], "--controller-layers"), (["--controller-layers", "9"], "--controller-layers"),
    (["--target-bitflops", "0"], "> 0"), (["--target-bitflops", "-5e6"], "> 0"), (["--target-bitflops", "abc"], "number"),
])
def test_cli_bad_input_exit_2(cli_run, tmp_path, capsys, args, msg):
    model = cli_run[1].parent / "lenet.onnx"
    rc = main(["dynamic", str(model), "-o", str(tmp_path / "o")] + args)
    assert rc == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_config_rejects_bad_device_and_controller_conv():
    with pytest.raises(QtoolError, match="device must be"):
        DynamicConfig(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(QtoolError, match="CUDA"):
            DynamicConfig(device="cuda")
    else:  # on a GPU: TF32 would move fake-quant values across rounding boundaries (qtool.device)
        DynamicConfig(device="cuda")
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(QtoolError, match="--controller-conv"):
        DynamicConfig(controller_conv=-1)


def test_cli_missing_model_exit_2(tmp_path, capsys):
    assert main(["dynamic", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
