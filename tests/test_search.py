"""qtool search: space/objective arithmetic on a hand-checked graph, the NSGA-III front, fidelity of
the exported front on onnxruntime, resume after a crash, executors, bad input."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qtool.errors import QtoolError
from qtool.plan import QuantPlan
from exporters.qdq import apply_plan
from qtool.fusion import fuse
from qtool.bitsearch import (Candidate, NSGA3Config, QATEvaluator, SearchProblem, SearchSpace, SupernetEvaluator, make_objectives, non_dominated, rank_correlation, search)
from qtool.bitsearch.objectives import Metrics, metric

torch.set_num_threads(1)  # 2 shared cores: a second torch thread only spins


# -- a tiny graph whose numbers are checked by hand ---------------------------------------------
def tiny_cnn() -> onnx.ModelProto:
    r = np.random.default_rng(0)
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,1,4,4] x) => (float[N,5] y) {
            c1 = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
            r1 = Relu (c1)
            c2 = Conv (r1, W2, B2)
            r2 = Relu (c2)
            f = Flatten (r2)
            y = Gemm <transB = 1> (f, W3, B3) }""")
    for name, shape in (("W1", (2, 1, 3, 3)), ("B1", (2,)), ("W2", (3, 2, 1, 1)), ("B2", (3,)), ("W3", (5, 48)), ("B3", (5,))):
        m.graph.initializer.append(numpy_helper.from_array(r.normal(size=shape).astype(np.float32) * 0.5, name))
    return fuse(m, use_onnxsim=False)[0]


def test_space_and_objectives_hand_checked():
    fused = tiny_cnn()
    sp = SearchSpace.from_model(fused, (2, 4, 8))
    assert [l.op for l in sp.layers] == ["Conv", "Conv", "Gemm"]
    # MACs per sample: conv1 2x4x4 outputs x 1x3x3 taps, conv2 3x4x4 x 2, gemm 5 x 48.
    assert [l.macs for l in sp.layers] == [288, 96, 240]
    assert sp.n_var == 2 and sp.fixed == {0: (8, 8), 2: (8, 8)}
    c = sp.decode([1, 0])  # middle layer: w = choices[1] = 4, a = choices[0] = 2
    assert c.bits == ((8, 8), (4, 2), (8, 8)) and c.key == "w8a8-w4a2-w8a8"
    assert Candidate.from_key(c.key) == c and list(sp.encode(c)) == [1, 0]
    tb = sp.tensor_bits(c)
    names = {l.node: l for l in sp.layers}
    conv2 = sp.layers[1]
    assert tb[conv2.weight] == 4 and tb[conv2.input] == 2  # r1 feeds only conv2
    assert tb[sp.layers[2].input] == 8 and tb[sp.layers[0].input] == 8
    assert set(tb.values()) <= {2, 4, 8} and len(names) == 3
    calib = [{"x": np.random.default_rng(1).normal(size=(8, 1, 4, 4)).astype(np.float32)}]
    from qtool.calibrate import collect_stats

    stats = collect_stats(fused, calib, list(sp.groups))
    m = Metrics(fused, sp, {r: stats[r].range("minmax", signed=False) for r in sp.groups})
    # QuantEA FLOPs = sum MACs x (bw/32 + ba/32); BitOps = sum MACs x bw x ba.
    assert metric("flops").compute(c, m, None) == 288 * 0.5 + 96 * (4 / 32 + 2 / 32) + 240 * 0.5 == 282
    assert metric("bitops").compute(c, m, None) == 288 * 64 + 96 * 8 + 240 * 64 == 34560
    assert metric("packed_size").compute(c, m, None) == 18 + 3 + 240
    size = metric("size").compute(c, m, None)
    assert size == len(apply_plan(fused, m.reference_plan(c)).SerializeToString())
    assert metric("acc").compute(c, m, 0.75) == 0.25
    assert metric("latency").compute(c, m, None) > 0
    # Searching the first/last layers too: 6 genes; every uniform baseline is in the space.
    sp_all = SearchSpace.from_model(fused, (2, 4, 8), fix_first=None, fix_last=None)
    assert sp_all.n_var == 6 and sp_all.uniform(2).bits == ((2, 2),) * 3


def test_shared_input_group_takes_the_widest_bits():
    r = np.random.default_rng(0)
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,2,4,4] x) => (float[N,3,4,4] y) {
            c0 = Conv (x, W0)
            r0 = Relu (c0)
            a = Conv (r0, WA)
            b = Conv (r0, WB)
            s = Add (a, b)
            y = Conv (s, WC) }""")
    for name, shape in (("W0", (3, 2, 1, 1)), ("WA", (3, 3, 1, 1)), ("WB", (3, 3, 1, 1)), ("WC", (3, 3, 1, 1))):
        m.graph.initializer.append(numpy_helper.from_array(r.normal(size=shape).astype(np.float32), name))
    sp = SearchSpace.from_model(fuse(m, use_onnxsim=False)[0], (2, 4, 8))
    c = Candidate(((8, 8), (4, 2), (2, 8), (8, 8)))  # convA wants a2, convB a8 on the same tensor r0
    assert sp.effective(c)[1:3] == [(4, 8), (2, 8)]
    assert sp.tensor_bits(c)["r0"] == 8


def test_bad_space_and_objectives():
    fused = tiny_cnn()
    for bits in ((9,), (1, 8), ()):
        with pytest.raises(QtoolError, match="--bits"):
            SearchSpace.from_model(fused, bits)
    with pytest.raises(QtoolError, match="unknown objective 'speed'"):
        make_objectives("acc,speed")
    with pytest.raises(QtoolError, match="at least two"):
        make_objectives("acc")
    with pytest.raises(QtoolError, match="--pop"):
        NSGA3Config(pop=1)
    with pytest.raises(QtoolError, match="not in the space"):
        SearchSpace.from_model(fused, (4, 8)).check(Candidate(((8, 8), (2, 2), (8, 8))))


# -- target cpu: float / int8 / w4a8 per layer ------------------------------------------------------
def _metrics(fused, sp, shape=(8, 1, 4, 4)) -> Metrics:
    from qtool.calibrate import collect_stats

    stats = collect_stats(fused, [{"x": np.random.default_rng(1).normal(size=shape).astype(np.float32)}], list(sp.groups))
    return Metrics(fused, sp, {r: stats[r].range("minmax", signed=False) for r in sp.groups})


def _uniform(sp, name: str) -> Candidate:
    return dict(sp.uniform_members())[name]


def _run(model, x, tensor=None):
    """onnxruntime's value of the graph output, or of an intermediate `tensor` made an output."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    if tensor is not None:
        m.graph.output.insert(0, onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_cpu_space_has_one_gene_per_layer_and_keys_round_trip():
    from qtool.bitsearch.space import FLOAT

    fused = tiny_cnn()
    sp = SearchSpace.from_model(fused, target="cpu")
    assert sp.n_var == 1 and sp.levels == 3 and sp.fixed == {0: (8, 8), 2: (8, 8)}
    assert [n for n, _ in sp.uniform_members()] == ["float", "int8", "w4a8"]
    keys = [sp.decode([g]).key for g in range(3)]
    assert keys == ["w8a8-f-w8a8", "w8a8-w8a8-w8a8", "w8a8-w4a8-w8a8"]
    for g, k in enumerate(keys):
        assert Candidate.from_key(k) == sp.decode([g]) and list(sp.encode(Candidate.from_key(k))) == [g]
    free = SearchSpace.from_model(fused, target="cpu", fix_first=None, fix_last=None)
    c = free.decode([0, 1, 2])
    assert c.bits == ((FLOAT, FLOAT), (8, 8), (4, 8)) and c.key == "f-w8a8-w4a8" and Candidate.from_key(c.key) == c
    assert free.describe()["target"] == "cpu" and "target" not in SearchSpace.from_model(fused, (2, 4, 8)).describe()
    with pytest.raises(QtoolError, match="not in the space"):
        sp.check(Candidate(((8, 8), (2, 2), (8, 8))))  # a grid pair is no cpu choice
    with pytest.raises(QtoolError, match="apply to target grid"):
        SearchSpace.from_model(fused, (2, 4), target="cpu")
    with pytest.raises(QtoolError, match="must be 8"):
        SearchSpace.from_model(fused, target="cpu", fix_first=4)
    with pytest.raises(QtoolError, match="malformed"):
        Candidate.from_key("w8a8-g")


def test_float_layers_leave_the_plan_and_run_float_on_onnxruntime():
    from qtool.ortgraph import integer_kernel_report

    fused = tiny_cnn()
    sp = SearchSpace.from_model(fused, target="cpu", fix_first=None, fix_last=None)
    m = _metrics(fused, sp)
    conv1, conv2, gemm = sp.layers
    c = Candidate.from_key("f-f-w8a8")
    plan = m.reference_plan(c)
    assert not {conv1.weight, conv2.weight, conv1.input, conv2.input} & set(plan.tensors)
    assert {gemm.weight, gemm.input} <= set(plan.tensors)
    assert sp.effective(c) == [(32, 32), (32, 32), (8, 8)]
    qdq = apply_plan(fused, plan)
    rep = integer_kernel_report(qdq)
    assert (rep.integer_compute, rep.float_compute, rep.float_fallbacks) == (1, 2, 0)
    # The float convs compute what the FP32 model does: the Gemm's input before its Q is FP32's.
    root = next(r for r, members in sp.groups.items() if gemm.input in members)
    x = np.random.default_rng(2).normal(size=(4, 1, 4, 4)).astype(np.float32)
    fp32 = _run(fused, x, root)
    np.testing.assert_allclose(_run(qdq, x, root), fp32, rtol=1e-6, atol=1e-6)
    int8 = _run(apply_plan(fused, m.reference_plan(_uniform(sp, "int8"))), x, root)
    assert np.abs(int8 - fp32).max() > 1e-3  # the check can fail: quantized convs move it
    # Uniform float quantizes nothing here (no Add / pooling): the exported model is the FP32 model.
    flt = m.reference_plan(_uniform(sp, "float"))
    assert flt.tensors == {}
    np.testing.assert_array_equal(_run(apply_plan(fused, flt), x), _run(fused, x))


def test_float_objectives_count_32_bits_and_the_int8_boundary():
    fused = tiny_cnn()
    sp = SearchSpace.from_model(fused, target="cpu")
    m = _metrics(fused, sp)
    c = Candidate.from_key("w8a8-f-w8a8")
    # r1 is read only by the float conv2: float, so conv1 keeps 8-bit input and weight but its output is float.
    assert sp.effective(c) == [(8, 8), (32, 32), (8, 8)]
    assert metric("flops").compute(c, m, None) == 288 * 0.5 + 96 * 2 + 240 * 0.5 == 456
    assert metric("bitops").compute(c, m, None) == 288 * 64 + 96 * 1024 + 240 * 64
    assert metric("packed_size").compute(c, m, None) == 18 + 6 * 4 + 240
    from qtool.ortgraph import integer_kernel_report

    # onnxruntime fuses an integer conv only with its output quantized: conv1 falls back to a float
    # kernel on dequantized values (what the latency objective measures), conv2 runs float.
    rep = integer_kernel_report(apply_plan(fused, m.reference_plan(c)))
    assert (rep.integer_compute, rep.float_compute, rep.float_fallbacks) == (1, 2, 1)


def _two_readers() -> onnx.ModelProto:
    """c0 -> r0 read by two convs (a, b) -> Add -> conv c."""
    r = np.random.default_rng(0)
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,2,4,4] x) => (float[N,3,4,4] y) {
            c0 = Conv (x, W0, B0)
            r0 = Relu (c0)
            a = Conv (r0, WA, BA)
            b = Conv (r0, WB, BB)
            s = Add (a, b)
            y = Conv (s, WC, BC) }""")
    for name, shape in (("W0", (3, 2, 1, 1)), ("WA", (3, 3, 1, 1)), ("WB", (3, 3, 1, 1)), ("WC", (3, 3, 1, 1)),
                        ("B0", (3,)), ("BA", (3,)), ("BB", (3,)), ("BC", (3,))):
        m.graph.initializer.append(numpy_helper.from_array(r.normal(size=shape).astype(np.float32), name))
    return fuse(m, use_onnxsim=False)[0]


def test_a_float_conv_reading_a_quantized_input_runs_float():
    """Conv a float, its co-reader b int8, so their input r0 stays quantized: a reads it through its own
    per-channel DQ (passes.qdq), which keeps onnxruntime from quantizing a's float weight itself."""
    from qtool.ortgraph import integer_kernel_report

    fused = _two_readers()
    sp = SearchSpace.from_model(fused, target="cpu")
    m = _metrics(fused, sp, (8, 2, 4, 4))
    wa, wb = sp.layers[1].weight, sp.layers[2].weight
    c = Candidate.from_key("w8a8-f-w8a8-w8a8")
    assert sp.tensor_bits(c)["r0"] == 8 and sp.effective(c)[1] == (32, 8) and wa not in m.reference_plan(c).tensors
    r = integer_kernel_report(apply_plan(fused, m.reference_plan(c)))
    assert (r.integer_compute, r.float_compute) == (3, 1)
    both = Candidate.from_key("w8a8-f-f-w8a8")  # both readers float: r0 float, the Add operands stay 8-bit
    tb = sp.tensor_bits(both)
    assert tb["r0"] == 32 and tb[wa] == tb[wb] == 32 and tb["a"] == tb["b"] == 8
    assert sp.effective(both) == [(8, 8), (32, 32), (32, 32), (8, 8)]
    opts = sp.group_bit_options()
    assert opts[wa] == (4, 8, 32) and opts["r0"] == (8, 32) and opts["a"] == (8,)


# -- LeNet-5 on digits ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    from qtool.training import TrainConfig, train

    out = tmp_path_factory.mktemp("lenet") / "lenet.onnx"
    train(TrainConfig(model="lenet5", data="digits", epochs=3, batch_size=64, lr=0.05, threads=1), out, quiet=True)
    return onnx.load(str(out)), out


@pytest.fixture(scope="module")
def problem(lenet):
    return SearchProblem.from_model(lenet[0], "digits", objectives="acc,bitops", bits=(2, 4, 8), train_limit=300)


def supernet():
    return SupernetEvaluator(steps=40, batch_size=64, lr=0.01)


@pytest.fixture(scope="module")
def prepared(problem):
    ev = supernet()
    ev.prepare(problem.fused, problem.space, problem.data, seed=0)
    return ev


def test_search_front_plans_and_fidelity(problem, tmp_path):
    res = search(problem, NSGA3Config(pop=6, gens=2, seed=0), evaluator=supernet(), workdir=tmp_path / "w",
                 progress=False)
    assert res.front and res.generations == 2 and res.evaluated >= 6
    F = np.array([[1 - m["acc"], m["objectives"]["bitops"]] for m in res.front])
    assert len(non_dominated(F)) == len(F)  # no member dominates another
    for i, a in enumerate(F):
        assert not any(np.all(b <= a) and np.any(b < a) for j, b in enumerate(F) if j != i)
    for m in res.front:
        fused = onnx.load(str(tmp_path / "w" / m["model_file"]))
        plan = QuantPlan.load(tmp_path / "w" / m["plan_file"], fused)
        assert plan.calibrated and {t.bits for t in plan.tensors.values()} <= {2, 4, 8}
        for node, b in m["effective_bits"].items():
            layer = next(l for l in problem.space.layers if l.node == node)
            assert plan.tensors[layer.weight].bits == b["w"] and plan.tensors[layer.input].bits == b["a"]
        apply_plan(fused, plan)  # the plan is consumable as is
        # The score the search used is what the exported QDQ model gets on onnxruntime.
        assert abs(m["acc_ort"] - m["acc"]) <= 1.0 / len(problem.data.val) + 1e-9
    names = {b["name"] for b in res.baselines}
    assert names == {"w8a8", "w4a4", "w2a2"}
    d = json.loads((tmp_path / "w" / "front.json").read_text())
    assert len(d["front"]) == len(res.front) and d["front"][0]["plan"]["version"] == 1
    for f in ("front.csv", "pareto.png", "bits_heatmap.png", "evaluations.jsonl", "supernet.pt", "state.json"):
        assert (tmp_path / "w" / f).stat().st_size > 0
    assert len((tmp_path / "w" / "front.csv").read_text().splitlines()) == len(res.front) + 1
    with pytest.raises(QtoolError, match="--resume"):  # a workdir holding a search is not overwritten
        search(problem, NSGA3Config(pop=6, gens=2), evaluator=supernet(), workdir=tmp_path / "w", progress=False)


def test_initial_population_starts_from_the_uniform_pairs(problem, tmp_path):
    sp = problem.space
    pairs = [c.key for c in sp.uniform_pairs()]
    assert len(pairs) == 9 and pairs[0] == sp.uniform(8).key and pairs[-1] == sp.uniform(2).key
    X = NSGA3Config(pop=12, seed=0).initial(sp)
    assert X.shape == (12, sp.n_var) and X.min() >= 0 and X.max() < len(sp.choices)
    assert [sp.decode(x).key for x in X[:9]] == pairs
    assert NSGA3Config(pop=12, seed_uniform=False).initial(sp) is None
    search(problem, NSGA3Config(pop=6, gens=1, seed=0), evaluator=supernet(), workdir=tmp_path / "w", progress=False,
           export_front=False)
    log = [json.loads(line) for line in (tmp_path / "w" / "evaluations.jsonl").read_text().splitlines()]
    assert set(pairs[:6]) <= {r["key"] for r in log if r["origin"] == "search"}


def test_qat_evaluator_inherits_the_supernet(problem, tmp_path):
    """init_from=supernet.pt with 0 fine-tune steps scores a candidate exactly as the supernet does."""
    ev = supernet()
    (tmp_path / "w").mkdir()
    ev.prepare(problem.fused, problem.space, problem.data, workdir=tmp_path / "w", seed=0)
    c = problem.space.random(1, seed=5)[0]
    inherited = QATEvaluator(steps=0, batch_size=64, lr=0.01, init_from=tmp_path / "w" / "supernet.pt")
    inherited.prepare(problem.fused, problem.space, problem.data, seed=0)
    assert inherited.settings()["init"] == "supernet"
    assert inherited.evaluate(c) == ev.evaluate(c)
    fresh = QATEvaluator(steps=0, batch_size=64, lr=0.01)
    fresh.prepare(problem.fused, problem.space, problem.data, seed=0)
    assert fresh.evaluate(problem.space.uniform(2)) != inherited.evaluate(problem.space.uniform(2))
    with pytest.raises(QtoolError, match="not found"):
        QATEvaluator(init_from=tmp_path / "missing.pt")


def test_qat_evaluator_distill_learns_from_the_fp32_model(problem):
    """distill=1: the fine-tune's loss is the FP32 model's soft labels alone, so scrambled training
    labels tune the very same weights; distill=0 does not. The setting is recorded only when set."""
    train = problem.data.train
    scrambled = dataclasses.replace(problem.data, train=dataclasses.replace(train, labels=np.roll(train.labels, 1)))
    c = problem.space.uniform(4)
    tuned = {}
    for d in (1.0, 0.0):
        for name, data in (("labels", problem.data), ("scrambled", scrambled)):
            ev = QATEvaluator(steps=3, batch_size=32, lr=0.01, distill=d)
            ev.prepare(problem.fused, problem.space, data, seed=0)
            tuned[d, name] = torch.cat([v.flatten().float() for v in ev.tuned(c).state_dict().values()])
    assert torch.equal(tuned[1.0, "labels"], tuned[1.0, "scrambled"])
    assert not torch.equal(tuned[0.0, "labels"], tuned[0.0, "scrambled"])
    assert QATEvaluator(distill=0.5).settings()["distill"] == 0.5 and "distill" not in QATEvaluator().settings()
    for bad in (1.5, -0.1, True):
        with pytest.raises(QtoolError, match="distill"):
            QATEvaluator(distill=bad)


def test_qat_evaluator_loss_distill_ignores_the_labels(problem):
    """The search's fine-tunes take qat's loss: with loss distill (every output vs the FP32 model's),
    scrambled labels tune the very same weights. SearchConfig threads it and checks it."""
    from qtool.bitsearch.config import SearchConfig

    train = problem.data.train
    scrambled = dataclasses.replace(problem.data, train=dataclasses.replace(train, labels=np.roll(train.labels, 1)))
    c = problem.space.uniform(4)
    tuned = []
    for data in (problem.data, scrambled):
        ev = QATEvaluator(steps=3, batch_size=32, lr=0.01, loss="distill")
        ev.prepare(problem.fused, problem.space, data, seed=0)
        tuned.append(torch.cat([v.flatten().float() for v in ev.tuned(c).state_dict().values()]))
    assert torch.equal(tuned[0], tuned[1])
    assert ev.settings()["loss"] == "distill" and "loss" not in QATEvaluator().settings()
    assert SearchConfig(evaluator="qat", qat_loss="distill").qat_loss == "distill"
    with pytest.raises(QtoolError, match="qat_loss needs the qat evaluator"):
        SearchConfig(qat_loss="ce")
    with pytest.raises(QtoolError, match="qat_loss must be one of"):
        SearchConfig(evaluator="qat", qat_loss="kl")


class _Crash(SupernetEvaluator):
    """Dies after `n` evaluations, like a killed run."""

    def __init__(self, n, **kw):
        super().__init__(**kw)
        self.n = n

    def evaluate(self, c):
        if self.n == 0:
            raise RuntimeError("simulated crash")
        self.n -= 1
        return super().evaluate(c)


def test_resume_after_crash_reuses_log_and_gives_same_front(problem, tmp_path):
    algo = NSGA3Config(pop=6, gens=3, seed=3)
    ref = search(problem, algo, evaluator=supernet(), workdir=tmp_path / "ref", progress=False, export_front=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        search(problem, algo, evaluator=_Crash(7, steps=40, batch_size=64, lr=0.01), workdir=tmp_path / "crash",
               progress=False, export_front=False)
    logged = (tmp_path / "crash" / "evaluations.jsonl").read_text().splitlines()
    assert len(logged) == 7
    with open(tmp_path / "crash" / "evaluations.jsonl", "a") as f:
        f.write('{"key": "w8a8-w2a')  # a line torn by the kill: ignored
    res = search(problem, algo, evaluator=supernet(), workdir=tmp_path / "crash", resume=True, progress=False,
                 export_front=False)
    assert res.reused >= 7  # every finished evaluation came from the log
    total = len(set(json.loads(line)["key"] for line in (tmp_path / "ref" / "evaluations.jsonl").read_text().splitlines()))
    assert res.evaluated == total - 7
    assert [(m["key"], m["acc"]) for m in res.front] == [(m["key"], m["acc"]) for m in ref.front]
    with pytest.raises(QtoolError, match="settings differ"):
        search(problem, NSGA3Config(pop=6, gens=3, seed=4), evaluator=supernet(), workdir=tmp_path / "crash",
               resume=True, progress=False)


def test_qat_evaluator_export_and_kendall(problem, prepared):
    qat = QATEvaluator(steps=3, batch_size=32, lr=0.005)
    qat.prepare(problem.fused, problem.space, problem.data, seed=0)
    cands = [problem.space.uniform(8), problem.space.uniform(2)] + problem.space.random(2, seed=5)
    rc = rank_correlation(cands, prepared, qat)
    assert rc["n"] == 4 and (math.isnan(rc["tau"]) or -1 <= rc["tau"] <= 1)
    assert qat.evaluate(cands[2]) == qat.evaluate(cands[2])  # per-candidate seed: deterministic
    ok = qat.correct(cands[2])  # per-image answers, for paired comparisons
    assert ok.dtype == bool and ok.shape == problem.data.val.labels.shape and ok.mean() == qat.evaluate(cands[2])
    model, plan, acc = qat.materialize(cands[2])
    from qtool.bitsearch.report import ort_accuracy

    assert abs(ort_accuracy(apply_plan(model, plan), problem.data) - acc) <= 1.0 / len(problem.data.val) + 1e-9


def test_paired_difference_bootstraps_over_images():
    from benchmarks.search import paired_difference

    rng = np.random.default_rng(0)
    base = rng.random((2, 1000)) < 0.8  # 2 seeds x 1000 images
    same = paired_difference(base, base)
    assert same == {"diff_pp": 0.0, "ci95_pp": [0.0, 0.0]}
    better = base.copy()
    better[:, np.flatnonzero(~base[0] & ~base[1])[:20]] = True  # 20 images right in both seeds: +2 pp
    r = paired_difference(better, base)
    assert r["diff_pp"] == pytest.approx(2.0) and 0 < r["ci95_pp"][0] < 2.0 < r["ci95_pp"][1] < 4
    noisy = base.copy()
    noisy[0, :10] = ~noisy[0, :10]  # one seed flips 7 right answers and 3 wrong ones: -0.2 pp, not clear
    r = paired_difference(noisy, base)
    assert r["diff_pp"] == pytest.approx(-0.2) and r["ci95_pp"][0] < 0 < r["ci95_pp"][1]


def test_ray_executor(problem, prepared):
    ray = pytest.importorskip("ray")
    from qtool.bitsearch import RayExecutor

    ex = RayExecutor(num_cpus=2)
    try:
        cands = problem.space.random(3, seed=1)
        got = dict((c.key, acc) for c, acc in ex.run(prepared, cands))
    finally:
        ex.close()
    assert not ray.is_initialized()
    assert got == {c.key: prepared.evaluate(c) for c in cands}


def test_ray_missing_is_exit_2(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("no ray")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    from qtool.bitsearch.executors import make_executor

    with pytest.raises(QtoolError, match="pip install 'qtool\\[ray\\]'"):
        make_executor("ray", 2)


def test_cli_bad_input_exit_2(lenet, tmp_path, capsys):
    from qtool.cli import main

    path = str(lenet[1])
    cases = [["--objectives", "acc,speed"], ["--bits", "2,x"], ["--bits", "2,16"], ["--pop", "1"],
             ["--resume"], ["--data", "nope:/x"], ["--max-size", "-1"], ["--device", "tpu"],
             ["--sandwich-low", "3"], ["--sandwich-low", "4", "--eval", "qat"], ["--qat-distill", "0.5"],
             ["--qat-distill", "2", "--eval", "qat"], ["--target", "cpu", "--bits", "2,4"],
             ["--target", "cpu", "--fixed-bits", "4"], ["--sandwich-low", "4"],
             ["--target", "grid", "--sandwich-low", "3"]]
    if not torch.cuda.is_available():
        cases.append(["--device", "cuda"])
    for extra in cases:
        rc = main(["search", path, "--workdir", str(tmp_path / "w"), "--gens", "1", "--pop", "4"] + extra)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("qtool: error:") and "\n" not in err, (extra, err)
    assert main(["search", str(tmp_path / "missing.onnx"), "--workdir", str(tmp_path / "w2")]) == 2


def test_cli_search_prints_front(lenet, tmp_path, capsys):
    from qtool.cli import main

    rc = main(["search", str(lenet[1]), "--workdir", str(tmp_path / "w"), "--pop", "4", "--gens", "1",
               "--objectives", "acc,flops,size", "--train-limit", "200", "--supernet-epochs", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "Pareto front" in out and "w8a8" in out
    d = json.loads((tmp_path / "w" / "front.json").read_text())
    assert d["objectives"] == ["acc", "flops", "size"]
    # the front feeds the exporter directly: qtool export --from-search DIR --pick K
    pick = d["front"][0]["index"]
    for fmt in ("qdq", "qoperator"):
        out_file = tmp_path / f"picked.{fmt}.onnx"
        assert main(["export", "--from-search", str(tmp_path / "w"), "--pick", str(pick), "--int8", "--format", fmt,
                     "-o", str(out_file)]) == 0
        onnx.checker.check_model(onnx.load(out_file), full_check=True)
    capsys.readouterr()
    assert main(["export", "--from-search", str(tmp_path / "w"), "--pick", "999", "--int8", "-o",
                 str(tmp_path / "x.onnx")]) == 2
    assert "--pick 999" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()


def test_sigkill_mid_search_then_resume_matches_uninterrupted_run(lenet, tmp_path):
    """A real kill: `qtool search` in a subprocess gets SIGKILL once evaluations are logged; `--resume`
    reuses every one of them and ends with the same front as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def argv(workdir, *extra):
        return [sys.executable, "-m", "qtool", "search", str(lenet[1]), "--data", "digits", "--objectives", "acc,bitops",
                "--pop", "6", "--gens", "4", "--seed", "3", "--train-limit", "300", "--val-limit", "200",
                "--workdir", str(workdir), *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(argv(tmp_path / "ref"), check=True, capture_output=True, env=env, timeout=600)
    log = tmp_path / "killed" / "evaluations.jsonl"
    proc = subprocess.Popen(argv(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the search finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "killed" / "front.json").exists()
    before = {json.loads(line)["key"] for line in log.read_text().splitlines() if line.endswith("}")}
    assert len(before) >= 8
    subprocess.run(argv(tmp_path / "killed", "--resume"), check=True, capture_output=True, env=env, timeout=600)
    ref = json.loads((tmp_path / "ref" / "front.json").read_text())
    res = json.loads((tmp_path / "killed" / "front.json").read_text())
    assert res["reused"] >= len(before)
    after = [json.loads(line)["key"] for line in log.read_text().splitlines() if line.endswith("}")]
    assert set(after) >= before and len(after) == len(set(after))  # nothing re-evaluated, nothing lost
    assert [(m["key"], m["acc"]) for m in res["front"]] == [(m["key"], m["acc"]) for m in ref["front"]]


# -- target cpu on LeNet-5 ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_problem(lenet):
    return SearchProblem.from_model(lenet[0], "digits", objectives="acc,latency", target="cpu", train_limit=300,
                                    val_limit=300)


def _check_float_export(sp, c, model, plan, acc, data):
    """Float tensors are absent from the plan, the rest present; onnxruntime scores what the evaluator did."""
    from qtool.bitsearch.report import ort_accuracy
    from qtool.bitsearch.space import FLOAT

    eff = sp.effective(c)
    assert any(w == FLOAT for w, _ in eff) and any(w != FLOAT for w, _ in eff)
    for l, (w, a) in zip(sp.layers, eff):
        assert (l.weight in plan.tensors) == (w != FLOAT) and (l.input in plan.tensors) == (a != FLOAT), l.node
    assert abs(ort_accuracy(apply_plan(model, plan), data) - acc) <= 1.0 / len(data.val) + 1e-9


def test_cpu_supernet_and_qat_evaluators_export_float_layers(cpu_problem):
    sp, data = cpu_problem.space, cpu_problem.data
    c = sp.decode([g % sp.levels for g in range(sp.n_var)])  # float, int8, w4a8, ...
    assert "-f-" in c.key
    ev = SupernetEvaluator(steps=6, batch_size=64, lr=0.01)
    ev.prepare(cpu_problem.fused, sp, data, seed=0)
    assert [x.key for x in ev.sampler(sp)(np.random.default_rng(0))[:2]] == \
        [_uniform(sp, "float").key, _uniform(sp, "w4a8").key]  # the sandwich's ends
    _check_float_export(sp, c, *ev.materialize(c), data)
    qat = QATEvaluator(steps=2, batch_size=32, lr=0.005)
    qat.prepare(cpu_problem.fused, sp, data, seed=0)
    _check_float_export(sp, c, *qat.materialize(c), data)


def test_search_config_target_checks():
    from qtool.bitsearch.config import SearchConfig

    c = SearchConfig()
    assert c.target == "cpu" and c.bits is None and c.grid_bits == (2, 4, 8)
    assert SearchConfig(target="grid", bits=(4, 8)).grid_bits == (4, 8)
    for kw, msg in ((dict(bits=(2, 4)), "apply to target grid"), (dict(bits=(2, 4, 8)), "apply to target grid"),
                    (dict(fixed_bits=4), "fixed_bits must be 8"), (dict(sandwich_low=4), "applies to target grid"),
                    (dict(target="tpu"), "target must be one of")):
        with pytest.raises(QtoolError, match=msg):
            SearchConfig(**kw)


def test_pareto_plot_takes_extra_labelled_points(tmp_path):
    from types import SimpleNamespace

    from qtool.bitsearch.report import plot_pareto

    front = [{"objectives": {"acc": 0.9, "latency": 1.0}, "acc_ort": 0.89},
             {"objectives": {"acc": 0.8, "latency": 0.5}, "acc_ort": 0.8}]
    base = [{"name": "int8", "objectives": {"acc": 0.85, "latency": 0.6}, "acc_ort": 0.84}]
    res = SimpleNamespace(objectives=["acc", "latency"], front=front, baselines=base)
    plot_pareto(tmp_path / "plain.png", res)
    plot_pareto(tmp_path / "extra.png", res, extra=[("NNCF accuracy control", {"acc": 0.87, "latency": 0.7}),
                                                    ("no latency", {"acc": 0.5})])
    assert (tmp_path / "plain.png").read_bytes() != (tmp_path / "extra.png").read_bytes()


def test_cli_search_target_cpu_on_latency(lenet, tmp_path, capsys):
    from qtool.cli import main

    w = tmp_path / "w"
    rc = main(["search", str(lenet[1]), "--target", "cpu", "--objectives", "acc,latency", "--workdir", str(w),
               "--pop", "4", "--gens", "1", "--train-limit", "200", "--val-limit", "200"])
    out = capsys.readouterr().out
    assert rc == 0 and "Pareto front" in out
    d = json.loads((w / "front.json").read_text())
    assert d["target"] == "cpu" and d["choices"] == ["float", "int8", "w4a8"] and d["objectives"] == ["acc", "latency"]
    assert [b["name"] for b in d["baselines"]] == ["float", "int8", "w4a8"]
    assert all(b["acc_ort"] is not None and b["objectives"]["latency"] > 0 for b in d["baselines"])
    assert d["front"]
    from qtool.fusion import is_fused

    weight = {l.node: l.weight for l in SearchSpace.from_model(
        lenet[0] if is_fused(lenet[0]) else fuse(lenet[0])[0], target="cpu").layers}
    for m in d["front"]:
        assert set(m["key"].split("-")) <= {"f", "w8a8", "w4a8"} and set(m["choices"].values()) <= {"float", "int8", "w4a8"}
        assert m["objectives"]["latency"] > 0 and abs(m["acc_ort"] - m["acc"]) <= 1 / 200 + 1e-9
        plan = QuantPlan.load(w / m["plan_file"])
        for node, b in m["effective_bits"].items():
            assert (weight[node] in plan.tensors) == (b["w"] != 32)
    assert (w / "pareto.png").stat().st_size > 0


# -- supernet training: the sandwich rule --------------------------------------------------------
def _weight_steps(net):
    """weight tensor -> {bits: LSQ step sizes (a copy)}."""
    return {w: {b: q.scale.detach().clone() for b, q in ((int(b), q) for b, q in net.wq[k].q.items())}
            for w, k in net._wq_key.items()}


def _train(problem, ev, steps, monkeypatch):
    """Train a fresh supernet with `ev`'s sampler; record every configuration set and every loss's
    (logits, target)."""
    from qtool.bitsearch.evaluators import train_steps
    from qtool.bitsearch.supernet import QuantNet

    sp, data = problem.space, problem.data
    net = QuantNet(problem.fused, sp, data.x(data.calib_images))
    net.init_quantizers(data.calib_batches(1, 64)[0], [sp.uniform(b) for b in sp.choices])
    before = _weight_steps(net)
    seen, losses, opt_steps = [], [], []
    set_candidate = QuantNet.set_candidate
    monkeypatch.setattr(QuantNet, "set_candidate", lambda self, c: (seen.append(c), set_candidate(self, c))[1])
    cross_entropy = torch.nn.functional.cross_entropy

    def spy(logits, target, *a, **k):
        losses.append((logits.detach().clone(), target.detach().clone()))
        return cross_entropy(logits, target, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    sgd_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: (opt_steps.append(1), sgd_step(self, *a, **k))[1])
    train_steps(net, data, steps, batch_size=32, lr=0.01, seed=0, sample=ev.sampler(sp),
                distill=ev.distill and ev.sandwich)
    monkeypatch.undo()
    return net, before, seen, losses, len(opt_steps)


def test_sandwich_trains_largest_and_smallest_every_step_with_inplace_distillation(problem, monkeypatch):
    sp = problem.space
    big, small = sp.uniform(8), sp.uniform(2)
    ev = SupernetEvaluator(steps=3, distill=True)
    assert ev.sandwich and ev.n_random == 1  # the defaults
    net, before, seen, losses, opt_steps = _train(problem, ev, 3, monkeypatch)
    # Each step: the largest, the smallest, then a random configuration, one optimizer step for all three.
    assert opt_steps == 3 and len(seen) == 9
    assert seen[0::3] == [big] * 3 and seen[1::3] == [small] * 3
    assert all(c not in (big, small) for c in seen[2::3]) and len(set(seen[2::3])) == 3
    # The largest learns from the labels; the others from its detached softmax on the same batch.
    for s in range(3):
        (t_logits, labels), *students = losses[3 * s:3 * s + 3]
        assert labels.dtype == torch.int64
        for logits, target in students:
            assert target.dtype == torch.float32 and logits.shape == t_logits.shape
            assert torch.allclose(target, torch.softmax(t_logits, dim=1))
            assert not torch.equal(logits, t_logits)  # another configuration, another output
    # So both ends of the space trained: every searched weight's 8-bit and 2-bit step sizes moved.
    after = _weight_steps(net)
    searched = {sp.layers[i].weight for i in sp.searched}
    for w in searched:
        for b in (8, 2):
            assert not torch.equal(after[w][b], before[w][b]), (w, b)


def test_without_sandwich_only_the_sampled_bits_train(problem, monkeypatch):
    """The failure the sandwich rule fixes: one per-layer uniform draw per step trains, in each layer,
    only the bit-width drawn (all-8-bit is drawn with probability 3^-n_var)."""
    sp = problem.space
    ev = SupernetEvaluator(steps=1, sandwich=False, distill=True)
    net, before, seen, losses, opt_steps = _train(problem, ev, 1, monkeypatch)
    assert opt_steps == 1 and len(seen) == 1 and len(losses) == 1 and losses[0][1].dtype == torch.int64
    bits = sp.tensor_bits(seen[0])
    after = _weight_steps(net)
    for i in sp.searched:
        w = sp.layers[i].weight
        moved = {b for b in after[w] if not torch.equal(after[w][b], before[w][b])}
        assert moved == {bits[w]}, (w, moved, bits[w])
    with pytest.raises(QtoolError, match="n_random"):
        SupernetEvaluator(sandwich=False, n_random=0)


def test_sandwich_low_lifts_the_small_end_and_random_draws_keep_every_bit_width(problem, monkeypatch):
    sp = problem.space
    ev = SupernetEvaluator(steps=4, sandwich_low=4)
    assert ev.settings()["sandwich_low"] == 4 and "sandwich_low" not in SupernetEvaluator().settings()
    net, before, seen, losses, opt_steps = _train(problem, ev, 4, monkeypatch)
    assert opt_steps == 4 and len(seen) == 12
    assert seen[0::3] == [sp.uniform(8)] * 4 and seen[1::3] == [sp.uniform(4)] * 4
    # 2 bits is no longer an end, but the random configurations still draw it (and so train it).
    assert any(2 in pair for c in seen[2::3] for pair in c.bits)
    with pytest.raises(QtoolError, match="sandwich_low 3 is not one of"):
        SupernetEvaluator(steps=1, sandwich_low=3).sampler(sp)
    with pytest.raises(QtoolError, match="needs the sandwich"):
        SupernetEvaluator(sandwich=False, sandwich_low=4)


def test_calibration_batches_mix_classes_of_a_class_sorted_training_set(problem, tmp_path):
    """BN re-calibration normalizes by per-batch statistics: a training set stored class by class must
    still give calibration batches holding many classes (label written into pixel 0 to check)."""
    from qtool.bitsearch import SearchData

    shape = problem.data.train.images.shape[1:]
    labels = np.repeat(np.arange(10), 120)  # sorted by class, like CIFAR read from class folders
    x = np.random.default_rng(0).integers(0, 255, size=(len(labels), *shape)).astype(np.uint8)
    x.reshape(len(x), -1)[:, 0] = labels
    np.savez(tmp_path / "sorted.npz", x=x, y=labels)
    data = SearchData.load(problem.fused, f"npz:{tmp_path / 'sorted.npz'}", calib_size=256)
    batches = [data.calib_images[i:i + 64] for i in range(0, 256, 64)]
    for b in batches:
        assert len(np.unique(b.reshape(len(b), -1)[:, 0])) >= 8


def test_default_objectives_follow_the_target():
    from qtool.bitsearch.config import SearchConfig

    # On CPU only float vs int8 changes what runs, so the default is measured latency, not FLOPs.
    assert SearchConfig().objectives == ("acc", "latency")
    assert SearchConfig(target="grid").objectives == ("acc", "flops")
    assert SearchConfig(objectives=("acc", "size")).objectives == ("acc", "size")
    with pytest.raises(QtoolError, match="at least two"):
        SearchConfig(objectives=("acc",))


# -- the ptq evaluator ----------------------------------------------------------------------------
def test_ptq_evaluator_uniform_int8_is_qtool_quantize_and_float_layers_leave_the_plan(cpu_problem):
    from qtool.bitsearch.evaluators import make_evaluator
    from qtool.bitsearch.report import ort_accuracy
    from qtool.data import model_image_input
    from qtool.ptq import QuantConfig, quantize_plan

    sp, data = cpu_problem.space, cpu_problem.data
    ev = make_evaluator("ptq")
    ev.prepare(cpu_problem.fused, sp, data, seed=0)
    _, ref = quantize_plan(cpu_problem.fused, data.calib_feeds(model_image_input(cpu_problem.fused)[0]), QuantConfig())
    int8 = ev.plan(_uniform(sp, "int8"))
    assert int8.tensors == ref.tensors  # every layer int8: exactly what `qtool quantize` plans
    assert ev.evaluate(_uniform(sp, "int8")) == ort_accuracy(apply_plan(cpu_problem.fused, ref), data)
    w4 = ev.plan(_uniform(sp, "w4a8"))
    inner = [l for i, l in enumerate(sp.layers) if i not in sp.fixed]
    assert inner and all(w4.tensors[l.weight].bits == 4 and w4.tensors[l.input].bits == 8 for l in inner)
    assert all(int8.tensors[l.weight].bits == 8 for l in inner)
    c = sp.decode([g % sp.levels for g in range(sp.n_var)])  # float, int8, w4a8, ...
    model, plan, acc = ev.materialize(c)
    _check_float_export(sp, c, model, plan, acc, data)
    assert ort_accuracy(apply_plan(model, plan), data) == acc  # the searched accuracy is the deployed one
    assert ev.evaluate(_uniform(sp, "float")) == ort_accuracy(cpu_problem.fused, data)


def test_cli_search_eval_ptq_front_is_rechecked_equal(lenet, tmp_path, capsys):
    from qtool.cli import main

    w = tmp_path / "w"
    rc = main(["search", str(lenet[1]), "--eval", "ptq", "--objectives", "acc,latency,size", "--workdir", str(w),
               "--pop", "6", "--gens", "2", "--val-limit", "300"])
    assert rc == 0 and "Pareto front" in capsys.readouterr().out
    d = json.loads((w / "front.json").read_text())
    assert d["front"] and all(m["acc_ort"] == m["acc"] for m in d["front"] + d["baselines"] if "acc" in m)
    assert (w / "pareto.png").exists()
