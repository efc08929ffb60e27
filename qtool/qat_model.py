"""The torch core of `qtool qat` (see `qtool.qat_train` for the method, the algorithms and the fidelity
argument): calibration, the fake-quant model with one quantizer per plan tensor in the lifted
graph's slots (`build_qat_model`; BatchNormalization per `QATConfig.bn`, `qtool.bn_strategy`), its
training (`train_qat`), its plan (`QATModel.to_plan`, the slots read back by `LiftedModule.to_plan`)
and onnxruntime-exact eval mode. `run_qat` is the one run both `qtool qat` and the search's
`--eval qat` evaluator (through `qat_finetune`, which leaves out qat's reporting) go through."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from qtool.data import ImageDataset
from qtool.distill import OutputLoss, class_score_outputs, distill_loss, distill_objective, fp32_teacher, output_losses
from qtool.errors import QtoolError
from qtool.fakequant import (BNNWeightFakeQuant, DoReFaWeightFakeQuant, EMAFakeQuant, FakeQuant, LSQFakeQuant,
                             MinMaxFakeQuant, PACTFakeQuant)
from qtool.bn_strategy import ConvBNFold, FoldPair, resolve_bn, unfold_map
from qtool.lift import LiftedModule, lift
from qtool.ortexact import install_exact_eval
from qtool.plan import QuantPlan, TensorQuant
from qtool.preprocess import Preprocess
from qtool.qat_bits import TensorSpec, resolve_bits
from qtool.qat_config import QATConfig
from qtool.qat_quantizers import (BiasFakeQuant, SharedFakeQuant, WeightMinMaxFakeQuant, lsq_activation, lsq_weight,
                                  tensor_quant)
from qtool.quant_points import quant_points
from qtool.quant_slots import active_quantizer
from qtool.ptq import QuantConfig, build_plan
from qtool.fusion import is_fused, fuse, untie_biases
from qtool.qat_data import QATData, input_feeds, labels_of, train_batches
from qtool.trainloop import EpochMeter, forward, split_decay, train_loop

__all__ = ["QATModel", "QATObjective", "build_qat_model", "train_qat", "run_qat", "qat_finetune",
           "calibrate_activations", "start_run", "resolve_objective"]

_CALIB_SEED = 20151211


def _device(config: QATConfig) -> torch.device:
    from qtool.device import resolve_device

    return resolve_device(config.device, option="device")


def _calib_batches(fused: onnx.ModelProto, ds: QATData, pre: Preprocess, n: int, bs: int = 64):
    from qtool.feeds import model_inputs

    idx = np.sort(np.random.default_rng(_CALIB_SEED).permutation(len(ds))[:n])
    batch_dims = [s.dims[0] for s in model_inputs(fused) if s.dims and s.dims[0] is not None]
    fixed = batch_dims[0] if batch_dims else None
    bs = fixed or bs
    out = []
    for i in range(0, len(idx), bs):
        if fixed is None or len(idx[i:i + bs]) == fixed:
            out.append(input_feeds(fused, ds, pre, idx[i:i + bs]))
    if not out:
        raise QtoolError(f"model has a fixed batch of {fixed}: calibration needs at least that many images")
    return out


def _act_quantizer(algo: str, bits: int, rmin: float, rmax: float, delay: int, decay: float,
                   notes: list[str], name: str, start: tuple[float, int] | None = None) -> FakeQuant:
    if start is not None:  # a plan's (scale, zero point): its range at these (unsigned) bits
        rmin, rmax = -start[1] * start[0], (2**bits - 1 - start[1]) * start[0]
    nonneg = rmin >= 0.0
    if algo in ("pact", "dorefa") and not nonneg:
        notes.append(f"{algo}: {name} has negative values; quantized with the ema observer")
    if algo == "lsq":
        return lsq_activation(bits, rmin, rmax, delay, start)
    if algo in ("pact", "dorefa") and nonneg:
        return PACTFakeQuant(bits, alpha=max(rmax, 1e-6), quant_delay=delay, learn_alpha=algo == "pact")
    fq = (MinMaxFakeQuant(bits, signed=False, quant_delay=delay) if algo == "minmax"
          else EMAFakeQuant(bits, signed=False, quant_delay=delay, decay=decay))
    fq.min_val, fq.max_val = torch.tensor(float(rmin)), torch.tensor(float(rmax))
    return fq


def _weight_quantizer(algo: str, s: TensorSpec, w: torch.Tensor, axis: int | None) -> FakeQuant:
    bits, delay = s.bits, s.quant_delay
    if algo == "bnn" and s.uniform:
        return BNNWeightFakeQuant(axis=axis, quant_delay=delay)
    if algo in ("minmax", "ema", "bnn"):  # bnn: weights given their own bits (first/last, rules, plans)
        return WeightMinMaxFakeQuant(bits, axis, delay)
    dims = list(range(w.dim())) if axis is None else [d for d in range(w.dim()) if d != axis]
    a = w.detach().float().abs()
    if algo == "lsq":
        return lsq_weight(bits, w, axis, delay)  # the LSQ paper's init, 2 mean|w| / sqrt(qmax), per channel
    return DoReFaWeightFakeQuant(bits, a.amax(dim=dims), axis, delay)  # pact / dorefa


def _install_exact_eval(lifted: LiftedModule) -> list[str]:
    """Snapshot the trained quantization parameters into qtool.ortexact's eval-mode kernels."""
    weights = set(lifted.trainable_initializers())

    def quant_of(t: str) -> TensorQuant | None:
        fq = lifted.quantizer(t)
        if fq is None or isinstance(fq, BiasFakeQuant):
            return None
        kind = "weight" if t in weights else "activation"
        return tensor_quant(kind, active_quantizer(fq))

    def weight_quant_of(fold: nn.Module) -> TensorQuant | None:
        return tensor_quant("weight", fold.weight_fq) if isinstance(fold, ConvBNFold) else None

    return install_exact_eval(lifted, quant_of, weight_quant_of)


def calibrate_activations(fused: onnx.ModelProto, train_data: QATData, pre: Preprocess,
                          calib_size: int, roots: list[str] | None = None) -> dict:
    """PTQ's minmax statistics of every activation root of the fused graph on onnxruntime (`calib_size`
    images of `train_data`, a fixed sample): the plan skeleton and the quantizers' initial ranges.
    They depend on the FP32 graph only, so a caller training many bit configurations of one graph (the
    search's `--eval qat`) computes them once and passes them to `build_qat_model`."""
    from qtool.calibrate import collect_stats

    if roots is None:  # every activation root of the graph
        roots = quant_points(fused).activation_roots()
    return collect_stats(fused, _calib_batches(fused, train_data, pre, calib_size), roots)


@dataclass
class QATModel:
    """One QAT run's fake-quant model: the lifted graph with a quantizer at every quantization point
    the configuration quantizes (`build_qat_model`), trained by `train_qat`, read back by `to_plan`."""
    lifted: LiftedModule
    fused: onnx.ModelProto  # the fused graph the plan refers to
    spec: dict[str, TensorSpec]
    quantizers: dict[str, nn.Module]  # plan tensor -> its quantizer (pass-through tensors: SharedFakeQuant)
    pairs: dict[str, FoldPair]  # Conv node -> the Conv->BN pair trained unfolded (bn "unfold")
    total_steps: int
    notes: list[str]
    device: torch.device | None = None  # where it trains
    objective: "QATObjective | None" = None  # the loss it trains with (resolve_objective, in run_qat)
    names: dict[str, str] | None = None  # fused tensor -> the lifted graph's (bn unfold lifts the unfused graph)

    def _fold_of(self, weight: str) -> ConvBNFold:
        return next(m for m in self.lifted.replaced.values() if isinstance(m, ConvBNFold)
                    and m.weight_fq is self.quantizers[weight])

    def to_plan(self, meta: dict) -> tuple[onnx.ModelProto, QuantPlan]:
        """(the fused graph with every weight replaced by its fake-quantized value, the QuantPlan of the
        trained quantizers' qparams): `apply_plan` of the two is the exported QDQ model."""
        lifted, fused, quantizers = self.lifted, self.fused, self.quantizers
        lifted.eval()
        fused_inits = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}
        fused_nodes = {n.name: n for n in fused.graph.node}
        pair_weights = {fused_nodes[c].input[1] for c in self.pairs}
        tuned = copy.deepcopy(fused)
        inits = {t.name: t for t in tuned.graph.initializer}
        state = lifted.export_weights()
        for n in inits:
            if n in state:
                inits[n].CopyFrom(numpy_helper.from_array(state[n].astype(fused_inits[n].dtype), n))
        with torch.no_grad():
            for c, p in self.pairs.items():
                fold = self._fold_of(fused_nodes[c].input[1])
                vals = [lifted.tensor(x) if x else None for x in p.inputs[1:]]
                w_fold, b_fold = fold.folded(*vals)
                fq_w = fold.weight_fq(w_fold)
                wn, bn_ = fused_nodes[c].input[1], fused_nodes[c].input[2]
                inits[wn].CopyFrom(numpy_helper.from_array(fq_w.cpu().numpy().astype(np.float32), wn))
                inits[bn_].CopyFrom(numpy_helper.from_array(b_fold.cpu().numpy().astype(np.float32), bn_))
            for t, s in self.spec.items():
                if s.kind == "weight" and t not in pair_weights:
                    inits[t].CopyFrom(numpy_helper.from_array(
                        quantizers[t](lifted.tensor(t)).cpu().numpy().astype(np.float32), t))
        plan = lifted.to_plan(quant_points(fused), meta, self.names)
        if set(plan.tensors) != set(self.spec):  # a slot the bits did not ask for, or one missing: say so
            raise QtoolError(f"the QAT model's quantizer slots ({len(plan.tensors)} plan tensors) do not match "
                             f"its bit specification ({len(self.spec)} tensors)")
        return tuned, plan

    def install_exact_eval(self) -> list[str]:
        """Move the module to the CPU and make its eval mode compute onnxruntime's integer kernels
        (qtool.ortexact): cuDNN rounds float convolutions its own way (qtool.device)."""
        self.lifted.cpu()
        return _install_exact_eval(self.lifted)


def _total_steps(config: QATConfig, train_data: ImageDataset) -> int:
    if config.steps is not None:
        return config.steps
    return config.epochs * math.ceil(min(len(train_data), config.train_limit or len(train_data)) / config.batch_size)


def build_qat_model(model: onnx.ModelProto, train_data: ImageDataset, config: QATConfig, pre: Preprocess,
                    device: torch.device, notes: list[str], stats: dict | None = None) -> QATModel:
    """Fuse, resolve the bits, calibrate (unless `stats` are given, see `calibrate_activations`), lift
    and put one quantizer per plan tensor (the module docstring's flow up to training)."""
    original = model
    fused = model if is_fused(model) else fuse(model)[0]
    fused = untie_biases(fused)
    spec = resolve_bits(fused, config)
    if not spec:
        raise QtoolError("nothing to quantize: the configuration leaves every tensor float")
    points = quant_points(fused)

    # PTQ calibration (minmax) of every activation root: the plan skeleton and the initial ranges.
    if stats is None:
        roots = list(dict.fromkeys(points.root(t) for t, s in spec.items() if s.kind == "activation"))
        stats = calibrate_activations(fused, train_data, pre, config.calib_size, roots)
    skeleton = build_plan(fused, QuantConfig(calib="minmax"), stats)  # PTQ's placement, axes, granularity
    missing = [t for t in spec if t not in skeleton.tensors]
    if missing:
        raise QtoolError(f"tensors without calibration data (not reached by the input?): {missing[:5]}")

    # Lift: the unfused graph with Conv->BN kept when it maps onto the fused one, else the fused graph.
    mapped = None
    if resolve_bn("qat", config.bn, unfused_available=original is not fused and not is_fused(original)) == "unfold":
        mapped = unfold_map(original, fused, spec, notes)
    if mapped is not None:
        lifted, pairs, names = mapped
    else:
        lifted, pairs, names = lift(fused), {}, {t: t for t in spec}
    fused_inits = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}
    fused_nodes = {n.name: n for n in fused.graph.node}
    pair_of_weight = {fused_nodes[c].input[1]: p for c, p in pairs.items()}

    total_steps = _total_steps(config, train_data)
    freeze = config.freeze_bn if config.freeze_bn is not None else total_steps // 2

    # One quantizer per plan tensor; pass-through tensors share their root's. They start at a given
    # plan's scales (config.plan_init) where it has the tensor at its shape, else at minmax calibration.
    start = {name: (scales, zps) for name, scales, zps in config.plan_init}
    quantizers: dict[str, nn.Module] = {}
    started = 0
    for t, s in spec.items():
        if s.kind == "activation" and points.root(t) == t:
            rmin, rmax = stats[t].range("minmax", signed=False)
            given = start.get(t)
            act_start = (given[0][0], given[1][0]) if given and len(given[0]) == 1 \
                and 0 <= given[1][0] < 2**s.bits else None
            started += act_start is not None
            quantizers[t] = _act_quantizer(config.algo, s.bits, rmin, rmax, s.quant_delay, config.ema_decay,
                                           notes, t, act_start)
    for t, s in spec.items():
        if s.kind == "activation" and points.root(t) != t:
            quantizers[t] = SharedFakeQuant(quantizers[points.root(t)])
        elif s.kind == "weight":
            w = torch.from_numpy(np.array(fused_inits[t], copy=True))
            quantizers[t] = _weight_quantizer(config.algo, s, w, skeleton.tensors[t].axis)
            given = start.get(t)
            if given and isinstance(quantizers[t], LSQFakeQuant) and len(given[0]) == quantizers[t].scale.numel():
                with torch.no_grad():
                    quantizers[t].scale.copy_(torch.tensor(given[0]).reshape(quantizers[t].scale.shape))
                started += 1
    if config.plan_init:
        own = sum(1 for t, s in spec.items() if s.kind == "weight" or points.root(t) == t)  # not pass-throughs
        notes.append(f"started from the plan's scales at {started} of {own} quantizers "
                     "(the others: minmax calibration)")
    if config.algo == "bnn":
        notes.append("bnn: binary weights where the uniform bits apply (others: per-channel minmax at their "
                     "bits); activations at their bits with the ema observer")
    for t, s in spec.items():  # weights first: bias quantizers read the weight scale of this step
        if s.kind != "weight":
            continue
        if t in pair_of_weight:
            p = pair_of_weight[t]
            fold = ConvBNFold(lifted.node_attrs(p.conv), p.eps, p.momentum, quantizers[t], freeze)
            orig_bn = next(n.name for n in original.graph.node if p.bn_out in n.output)
            lifted.replace_nodes([p.conv, orig_bn], fold, p.inputs, [p.bn_out], quantizes={t: quantizers[t]})
        else:
            lifted.set_weight_quantizer(names[t], quantizers[t])
    bias_fqs: dict[str, BiasFakeQuant] = {}
    for b, (inp, w) in points.biases().items():
        if inp in quantizers and w in quantizers:
            bias_fqs[b] = BiasFakeQuant(quantizers[inp], quantizers[w])
            if w in pair_of_weight:
                lifted.replaced[next(k for k, m in lifted.replaced.items()
                                     if isinstance(m, ConvBNFold) and m.weight_fq is quantizers[w])].bias_fq = bias_fqs[b]
            else:
                lifted.set_quantizer(b, bias_fqs[b])
    for t, s in spec.items():
        if s.kind == "activation":
            lifted.set_quantizer(names[t], quantizers[t])
    lifted.to(device)
    if pairs:
        notes.append(f"bn unfold: {len(pairs)} Conv->BatchNormalization pairs trained unfolded; "
                     f"BN statistics frozen after step {freeze}")
    return QATModel(lifted, fused, spec, quantizers, pairs, total_steps, notes, device, names=names)


def start_run(config: QATConfig) -> tuple[torch.device, torch.Generator]:
    """The run's device and batch generator; torch's global seed is set too (quantizer inits, dropout)."""
    if not isinstance(config, QATConfig):
        raise QtoolError(f"config must be a QATConfig, got {type(config).__name__}")
    device = _device(config)
    torch.manual_seed(config.seed)
    return device, torch.Generator().manual_seed(config.seed)


@dataclass(frozen=True)
class QATObjective:
    """What a QAT run minimizes (QATConfig.loss resolved against the model and the data): "ce", the
    labels' cross-entropy on the one class-score output `ce_output` (mixed with the FP32 model's
    soft labels by QATConfig.distill), or "distill", every output against the FP32 model's
    (`losses`, qtool.distill). `class_outputs`: the outputs holding class scores (argmax checked)."""
    loss: str
    outputs: tuple[str, ...]
    class_outputs: tuple[str, ...]
    ce_output: str | None = None
    losses: tuple[OutputLoss, ...] = ()

    @property
    def needs_teacher(self) -> bool:
        return self.loss == "distill"

    def lines(self) -> list[str]:
        if self.loss == "ce":
            return [f"loss ce on {self.ce_output} (labels)"]
        return ["loss distill (FP32 outputs): " + "; ".join(o.describe() for o in self.losses)]


def _fp32_outputs(fused: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def resolve_objective(fused: onnx.ModelProto, train_data: QATData, config: QATConfig, pre: Preprocess) -> QATObjective:
    """QATConfig.loss against this model and data: the outputs' kinds are read off the FP32 model's
    outputs on a few training samples (qtool.distill.is_class_scores)."""
    labeled = labels_of(train_data) is not None
    sample = _calib_batches(fused, train_data, pre, min(64, len(train_data)))[0]
    outs = _fp32_outputs(fused, sample)
    classes = tuple(class_score_outputs(fused, outs, labeled))
    loss = config.loss
    if loss == "auto":
        loss = "ce" if labeled and len(classes) == 1 and not config.loss_weights else "distill"
    if loss == "ce":
        if not labeled:
            raise QtoolError("loss ce trains on labels, but the data has none: use loss distill (--loss distill), "
                             "which trains against the FP32 model's outputs")
        if len(classes) != 1:
            raise QtoolError(f"loss ce needs exactly one class-score output (N x C), the model has {len(classes)} of "
                             f"outputs {list(outs)}: use loss distill (--loss distill)")
        return QATObjective("ce", tuple(outs), classes, ce_output=classes[0])
    if config.distill:
        raise QtoolError("distill (the soft-label weight) mixes into loss ce; loss distill trains on the FP32 "
                         "outputs alone")
    losses = output_losses(fused, outs, labeled, dict(config.loss_weights))
    return QATObjective("distill", tuple(outs), classes, losses=tuple(losses))


def run_qat(model: onnx.ModelProto, train_data: QATData, config: QATConfig, pre: Preprocess, *,
            notes: list[str] | None = None, stats: dict | None = None, teacher: nn.Module | None = None,
            before_training=None, on_epoch=None) -> QATModel:
    """One QAT run, the one code path of `qtool qat` and of the search's `--eval qat` evaluator: the
    run's seed and device (`start_run`), `build_qat_model`, its loss (`resolve_objective`), the FP32
    teacher when the loss needs one (unless given), `before_training(qm, teacher)` (qat's epoch-0 validation),
    `train_qat` with `on_epoch`. Returns the trained model in train mode; `to_plan` / `install_exact_eval` follow."""
    device, gen = start_run(config)
    qm = build_qat_model(model, train_data, config, pre, device, [] if notes is None else notes, stats)
    qm.objective = resolve_objective(qm.fused, train_data, config, pre)
    if (config.distill or qm.objective.needs_teacher) and teacher is None:
        teacher = fp32_teacher(qm.fused)
    if before_training is not None:
        before_training(qm, teacher)
    train_qat(qm, train_data, pre, config, device, gen, teacher=teacher, on_epoch=on_epoch)
    return qm


def qat_finetune(fused: onnx.ModelProto, train_data: QATData, config: QATConfig, pre: Preprocess, *,
                 stats: dict | None = None, teacher: nn.Module | None = None) -> QATModel:
    """`run_qat` without qat's reporting (no per-epoch validation, no onnxruntime fidelity check), for
    callers that tune many configurations of one graph (the search's `--eval qat` evaluator, which
    passes the FP32 statistics and the teacher it computes once). Returns the trained model, eval mode
    emulating onnxruntime's kernels as `qat`'s module does; `to_plan` gives the tuned graph and its plan."""
    qm = run_qat(fused, train_data, config, pre, stats=stats, teacher=teacher)
    qm.install_exact_eval()
    return qm


def objective_loss(qm: QATModel, teacher: nn.Module | None, config: QATConfig):
    """loss_fn(x, y) -> (the class-score output, loss) of `qm.objective` (qtool.trainloop)."""
    obj, lifted = qm.objective, qm.lifted
    shown = obj.ce_output or (obj.class_outputs[0] if obj.class_outputs else None)
    at = obj.outputs.index(shown) if shown is not None else None

    def pick(out):  # the output top-1 is counted on (the first one only counts samples)
        return out if isinstance(out, torch.Tensor) else out[at or 0]

    if obj.loss == "ce":
        def loss_fn(x, y):
            logits = pick(forward(lifted, x))
            if not config.distill:
                return logits, F.cross_entropy(logits, y)
            with torch.no_grad():
                soft = F.softmax(pick(forward(teacher, x)).float(), dim=1)
            return logits, distill_loss(logits, y, soft, config.distill)
        return loss_fn

    def loss_fn(x, y):
        out = forward(lifted, x)
        with torch.no_grad():
            ref = forward(teacher, x)
        return pick(out), distill_objective(list(obj.losses), out, ref)
    return loss_fn


def train_qat(qm: QATModel, train_data: QATData, pre: Preprocess, config: QATConfig, device: torch.device,
              gen: torch.Generator, *, teacher: nn.Module | None = None, on_epoch=None) -> None:
    """Train `qm` with `config`'s optimizer and cosine schedule: `epochs` passes over the (limited) train
    split, or exactly `steps` optimizer steps; `on_epoch(epoch, meter, bar)` after each epoch (after the
    steps). The loss is `qm.objective`'s (`objective_loss`; the FP32 `teacher` for distillation)."""
    from qtool.progress import progress

    lifted = qm.lifted
    n_all = len(train_data)
    pool = torch.randperm(n_all, generator=gen)[:config.train_limit] if config.train_limit else torch.arange(n_all)
    augment = False
    if isinstance(train_data, ImageDataset):
        c, h = train_data.shape[0], train_data.shape[1]
        augment = config.augment and c == 3 and h >= 16
    decay, no_decay = split_decay(lifted.parameters())  # no decay on biases, BN, scales, alphas
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = config.learning_rate
    opt = (torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=config.momentum > 0)
           if config.optimizer == "sgd" else torch.optim.Adam(groups, lr=lr))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(qm.total_steps, 1))
    if qm.objective is None:
        qm.objective = resolve_objective(qm.fused, train_data, config, pre)
    if teacher is not None:
        teacher = teacher.to(device).eval()
    loss_fn = objective_loss(qm, teacher, config)
    track = bool(qm.objective.class_outputs)

    def unlabeled(batches):  # top-1 only where there are labels and an output to score them on
        return batches if track else ((x, None) for x, _ in batches)

    if config.steps is not None:
        ds = train_data.subset(np.sort(pool.numpy())) if config.train_limit else train_data
        runs = [(0, unlabeled(train_batches(ds, pre, config.batch_size, gen, augment, steps=config.steps)))]
        epochs, total = 1, config.steps
    else:
        runs = ((e, unlabeled(train_batches(train_data, pre, config.batch_size, gen, augment, pool=pool)))
                for e in range(config.epochs))
        epochs, total = config.epochs, config.epochs * math.ceil(len(pool) / config.batch_size)
    with progress(disable=config.quiet) as bar:
        task = bar.add_task(f"qat {config.algo}", total=total, info="")
        for epoch, batches in runs:
            meter = EpochMeter()
            train_loop(lifted, batches, loss_fn, [opt], sched, device=device, meter=meter,
                       on_step=lambda i, loss: bar.update(task, advance=1, info=meter.info(epoch, epochs)))
            if on_epoch is not None:
                on_epoch(epoch, meter, bar)
