"""`qtool dynamic`: train a DQNet bit controller end to end with the K-way quantized network, compare it
with static QAT at the same average BitFLOPs, and deploy it on onnxruntime.

    result = dynamic(model, train_ds, val_ds, DynamicConfig(bits=(3, 4, 5), target="u4", epochs=1), out_dir)

Loss = CE + alpha * max(mean_over_batch(BitFLOPs(sample)) - target, 0) / total MACs (BitFLOPs counted
in units of the model's MACs, i.e. "b_w x b_a per MAC": alpha keeps one meaning for every model),
or with `penalty="meanbits"`: the same hinge on mean_bits(sample) - target_bits, target_bits the
uniform bit-width whose BitFLOPs equal the target (interpolated between the candidates). The hinge is
on the batch mean (`budget="batch"`, default): the target is an *average* budget, so a hard sample
may spend more than the target when easy ones spend less; `budget="sample"` puts it on every sample
(mean of max(BitFLOPs(sample) - target, 0)), which penalizes exactly that spread.

Learning rate: the network trained here is the *fused* graph (BN strategy "fold", qtool.bn_strategy:
BatchNormalization folded into the Conv weights, no normalization left), not Conv -> BN with batch
statistics as in `qtool.qat`'s "unfold". Without BN nothing renormalizes a layer whose gain grew in
one step, and the residual sums compound it: SGD (momentum 0.9) at qtool.qat's lr 0.01 diverges
within 3 steps on ResNet-20 / CIFAR-10 at every bit-width, 8 included (loss 0.4 -> 3+, chance accuracy), while the quantized net right after
initialisation is fine (uniform 4 bits: 84% of 86%). Hence the default lr 1e-3 (1e-3 and 3e-3
measured stable); a run whose training ends near chance accuracy gets a note in the report. The
controller (Adam, from zero logits) gets 1e-2: at 1e-3 its logits hardly move in a short run (40 steps
on ResNet-20: 2 configurations for all 2,000 val images).

Static baseline: the same network, quantizers and training budget (epochs, images, learning rates,
seed, initial weights), with one fixed configuration: the one whose BitFLOPs are closest to the
deployed dynamic model's average (greedy: from uniform lowest bits, widen the layers the controller
keeps widest first). Optionally also every uniform configuration.

`estimator="expected"` (with granularity "global"): instead of one Gumbel sample per image, every image
runs through each of the K uniform configurations, and CE and BitFLOPs are averaged under the
controller's softmax (`_expected_step`): exact, K forward passes per step (the Gumbel path also computes
all K branches of every layer).

`distill` > 0: both the dynamic and the static nets also learn from the FP32 model's soft labels.
Diagnostics in the report: the dynamic net's shared weights with every image at the matched static
configuration (`shared_at`: what sharing the weights costs), and `qtool.dynbits.routing` on the
deployment: the routing vs the same configurations shuffled across images (what the controller earns by
reading the image), an oracle router and the best single configuration at the same BitFLOPs.

Deployment (`qtool.dynbits.runtime`): the codebook is the `max_configs` configurations the controller
picks most often on the training images; at inference the controller picks the best-scoring
codebook entry. The PyTorch accuracy reported for the deployed model uses the same rule, so the ORT
accuracy must match it (the fidelity check); the free-argmax accuracy is reported beside it.
"""
from __future__ import annotations

import copy
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from qtool.data import ImageDataset, check_input_matches, epoch_batches, model_image_input
from qtool.device import check_device, resolve_device
from qtool.distill import distill_loss, fp32_teacher, soft_labels
from qtool.qat_config import check_weight
from qtool.errors import QtoolError
from qtool.trainloop import EpochMeter, train_loop
from qtool.dynbits.controller import DynamicNet
from qtool.dynbits.routing import correctness, routing_analysis
from qtool.preprocess import Preprocess, resolve_preprocess

PENALTIES = ("bitflops", "meanbits")
ESTIMATORS = ("gumbel", "expected")
BUDGETS = ("batch", "sample")
_EVAL_BATCH = 256
_CALIB_SEED = 20151211


@dataclass(frozen=True)
class DynamicConfig:
    bits: tuple[int, ...] = (3, 4, 5)
    target: float | str = "u4"  # BitFLOPs per sample, or "uB": those of uniform B bits
    penalty: str = "bitflops"
    budget: str = "batch"  # the penalty's hinge on the batch mean (an average budget) or on every sample
    alpha: float = 0.05
    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3  # network weights and quantizer steps (SGD, cosine); BN is folded: see the module docstring
    controller_lr: float = 1e-2  # controller (Adam): from zero logits, 1e-3 barely moves them in a short run
    train_limit: int | None = None
    val_limit: int | None = None
    max_configs: int = 8  # codebook size: QDQ models deployed
    calib_size: int = 256
    hidden: int = 64
    controller_conv: int = 0  # channels of the controller's own 3x3 conv on the stem output (0: GAP only)
    controller_layers: int = 1  # the controller reads the input of this layer; the layers before it are static
    granularity: str = "layer"  # a bit choice per layer, or "global": one per image for every layer
    estimator: str = "gumbel"  # controller training: hard Gumbel-softmax, or "expected" (global only; docstring)
    distill: float = 0.0  # weight of the FP32 model's soft labels in the loss (dynamic and static alike)
    seed: int = 0
    static_baseline: bool = True
    uniform_baselines: bool = False
    latency: bool = True
    latency_runs: int = 50
    threads: int = 1
    quiet: bool = False
    device: str = "cpu"  # torch device of training; evaluation, export and ORT run on the CPU (qtool.device)

    def __post_init__(self):
        if not isinstance(self.bits, tuple) or len(set(self.bits)) < 2 or any(
                not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= 8 for b in self.bits):
            raise QtoolError(f"--bits needs at least two different integers in 2..8, got {self.bits!r}")
        parse_target(self.target)
        if self.budget not in BUDGETS:
            raise QtoolError(f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if self.penalty not in PENALTIES:
            raise QtoolError(f"--penalty must be one of {', '.join(PENALTIES)}, got {self.penalty!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha >= 0):
            raise QtoolError(f"--alpha must be a number >= 0, got {self.alpha!r}")
        for k in ("epochs", "batch_size", "max_configs", "calib_size", "hidden", "latency_runs", "threads"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise QtoolError(f"{k.replace('_', '-')} must be an integer >= 1, got {v!r}")
        for k in ("train_limit", "val_limit"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise QtoolError(f"--{k.replace('_', '-')} must be an integer >= 1, got {v!r}")
        from qtool.dynbits.controller import GRANULARITIES

        if self.granularity not in GRANULARITIES:
            raise QtoolError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.estimator not in ESTIMATORS:
            raise QtoolError(f"--estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.estimator == "expected" and self.granularity != "global":
            raise QtoolError("--estimator expected needs --granularity global (it runs every configuration)")
        if not isinstance(self.controller_layers, int) or isinstance(self.controller_layers, bool) or \
                self.controller_layers < 1:
            raise QtoolError(f"--controller-layers must be an integer >= 1, got {self.controller_layers!r}")
        if not isinstance(self.controller_conv, int) or isinstance(self.controller_conv, bool) or self.controller_conv < 0:
            raise QtoolError(f"--controller-conv must be an integer >= 0, got {self.controller_conv!r}")
        check_weight(self.distill, "--distill")
        for k in ("lr", "controller_lr"):
            if not getattr(self, k) > 0:
                raise QtoolError(f"{k} must be > 0")
        check_device(self.device)


def parse_target(t: float | str) -> tuple[str, float]:
    """("abs", BitFLOPs) or ("uniform", bits)."""
    if isinstance(t, str):
        s = t.strip().lower()
        if s.startswith("u"):
            try:
                b = int(s[1:])
            except ValueError:
                b = 0
            if not 2 <= b <= 8:
                raise QtoolError(f"--target-bitflops uB needs B in 2..8, got {t!r}")
            return "uniform", float(b)
        try:
            t = float(s)
        except ValueError:
            raise QtoolError(f"--target-bitflops must be a number > 0 or uB (uniform B bits), got {t!r}") from None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise QtoolError(f"--target-bitflops must be > 0, got {t!r}")
    return "abs", float(t)


def uniform_bitflops(net: DynamicNet, b: float) -> float:
    """BitFLOPs with every dynamic layer at b bits (b may be fractional: the penalty's target)."""
    total = 0.0
    for l in net.layers:
        bw = b if l.dynamic is not None else l.bits
        ba = b if l.input_root in net.group_readers else net.static_bits_of(l.input_root)
        total += l.macs * bw * ba
    return total


def _target_bits(net: DynamicNet, target: float) -> float:
    """Uniform bit-width with BitFLOPs == target (bisection: BitFLOPs grow with b)."""
    lo, hi = 0.0, 64.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if uniform_bitflops(net, mid) < target else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Evaluation:
    acc: float
    logits: np.ndarray
    configs: np.ndarray  # N x L_dyn option indices
    bitflops: np.ndarray  # N

    def summary(self) -> dict:
        bf = self.bitflops
        return {"acc": self.acc, "avg_bitflops": float(bf.mean()), "bitflops_min": float(bf.min()),
                "bitflops_p10": float(np.percentile(bf, 10)), "bitflops_median": float(np.median(bf)),
                "bitflops_p90": float(np.percentile(bf, 90)), "bitflops_max": float(bf.max()),
                "distinct_configs": int(len({tuple(c) for c in self.configs}))}


@torch.no_grad()
def evaluate(net: DynamicNet, ds: ImageDataset, pre: Preprocess) -> Evaluation:
    net.eval()
    device = next(net.parameters()).device
    logits, cfgs, bfs = [], [], []
    for i in range(0, len(ds), _EVAL_BATCH):
        x = torch.from_numpy(pre.apply(ds.images[i:i + _EVAL_BATCH])).to(device)
        logits.append(net(x).float().cpu().numpy())
        cfgs.append(net.last_choice.argmax(-1).cpu().numpy())
        bfs.append(net.bitflops(net.last_choice, net.last_groups).cpu().numpy())
    lg = np.concatenate(logits)
    return Evaluation(float((lg.argmax(1) == ds.labels).mean()), lg, np.concatenate(cfgs), np.concatenate(bfs))


def train(net: DynamicNet, ds: ImageDataset, pre: Preprocess, config: DynamicConfig, target: float,
          label: str, seed: int, teacher: torch.nn.Module | None = None) -> list[dict]:
    """Train in the net's current mode (gumbel: with the penalty; fixed: plain CE). Returns per-epoch stats.

    `teacher` (with config.distill = d > 0): the task loss is (1 - d) CE(labels) + d CE(teacher's softmax),
    the FP32 model's soft labels (knowledge distillation, temperature 1)."""
    from qtool.progress import progress

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pool = torch.randperm(len(ds), generator=gen)[:config.train_limit] if config.train_limit else torch.arange(len(ds))
    augment = ds.shape[0] == 3 and ds.shape[1] >= 16
    ctl = set(id(p) for p in net.controller.parameters())
    decay = [p for p in net.parameters() if id(p) not in ctl and p.ndim > 1]
    no_decay = [p for p in net.parameters() if id(p) not in ctl and p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=config.lr, momentum=0.9, nesterov=True)
    opt_c = torch.optim.Adam(net.controller.parameters(), lr=config.controller_lr)
    steps = math.ceil(len(pool) / config.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(config.epochs * steps, 1))
    target_bits = _target_bits(net, target)
    dynamic = net.mode == "gumbel"
    device = next(net.parameters()).device
    d = config.distill if teacher is not None else 0.0
    if d:
        teacher = teacher.to(device).eval()
    expected = dynamic and config.estimator == "expected"
    costs = torch.tensor([net.config_bitflops(net.uniform(b)) for b in net.choices], device=device) if expected else None
    hist = []

    def loss_fn(xb, yb):
        soft = soft_labels(teacher, xb) if d else None
        if expected:
            logits, loss, bf, mean_bits = _expected_step(net, xb, yb, soft, d, costs)
        else:
            logits = net(xb)
            loss = distill_loss(logits, yb, soft, d)
            if dynamic:
                bf = net.bitflops(net.last_choice, net.last_groups)
                mean_bits = net.mean_bits(net.last_choice)
        if dynamic:
            excess = (bf - target) / net.total_macs if config.penalty == "bitflops" else mean_bits - target_bits
            pen = F.relu(excess.mean()) if config.budget == "batch" else F.relu(excess).mean()
            loss = loss + config.alpha * pen
            totals["bitflops"] += float(bf.detach().sum())
        return logits, loss

    # The controller's Adam steps only while it is trained (gumbel mode); a fixed configuration trains
    # the network alone.
    optimizers = [opt, opt_c] if dynamic else [opt]
    with progress(disable=config.quiet) as bar:
        task = bar.add_task(label, total=config.epochs * steps, info="")
        for epoch in range(config.epochs):
            t0 = time.perf_counter()
            meter = EpochMeter()
            totals = {"bitflops": 0.0}
            train_loop(net, epoch_batches(ds, pool, config.batch_size, pre, gen, augment), loss_fn, optimizers,
                       sched, device=device, meter=meter,
                       on_step=lambda i, loss: bar.update(task, advance=1, info=meter.info(epoch, config.epochs)))
            hist.append({"epoch": epoch + 1, "loss": meter.loss, "train_acc": meter.acc,
                         "train_avg_bitflops": totals["bitflops"] / meter.n if dynamic else None,
                         "seconds": round(time.perf_counter() - t0, 2)})
    net.eval()
    return hist


def _expected_step(net: DynamicNet, xb, yb, soft, d: float, costs: torch.Tensor):
    """estimator "expected" (granularity global): every image through each of the K uniform configurations,
    the loss is each image's task loss averaged under the controller's softmax p(k | image), and its cost
    the expected BitFLOPs. Exact and without sampling noise: the controller learns to put each image
    where its loss, plus the penalty's price of the bits, is lowest. Returns (logits of each image's most
    probable configuration, loss, expected BitFLOPs, expected mean bits) and leaves the net in gumbel mode."""
    outs, p = [], None
    try:
        for b in net.choices:
            net.set_mode("scored", fixed=net.uniform(b))
            outs.append(net(xb))
            if p is None:  # one controller draw (dropout) per step
                p = F.softmax(net.last_logits[:, 0], dim=1)
    finally:
        net.set_mode("gumbel")
    task = torch.stack([distill_loss(o, yb, soft, d, "none") for o in outs], 1)  # B x K
    best = p.detach().argmax(1)
    logits = torch.stack(outs)[best, torch.arange(len(yb), device=best.device)]
    return logits, (p * task).sum(1).mean(), p @ costs, p @ net.bits_t.to(p.device)


def collapse_note(label: str, hist: list[dict], n_classes: int, lr: float) -> str | None:
    """A note when training ended at (near) chance: a diverged run, whose comparison means nothing."""
    last = hist[-1]
    chance = 1.0 / max(n_classes, 1)
    if math.isfinite(last["loss"]) and last["train_acc"] >= chance + 0.1:
        return None
    return (f"{label} training ended at train accuracy {last['train_acc'] * 100:.1f}% (chance {chance * 100:.0f}%), "
            f"loss {last['loss']:.3g}: it diverged; lower lr (now {lr:g})")


def build_codebook(net: DynamicNet, ds: ImageDataset, pre: Preprocess, pool: np.ndarray, cap: int) -> tuple[np.ndarray, int]:
    """The `cap` argmax configurations most often chosen on `pool` (training images); and how many exist."""
    net.set_mode("argmax")
    ev = evaluate(net, ds.subset(pool), pre)
    counts = Counter(tuple(int(v) for v in c) for c in ev.configs)
    return np.array([c for c, _ in counts.most_common(cap)], dtype=np.int64), len(counts)


def matched_config(net: DynamicNet, target: float, preference: np.ndarray) -> tuple[int, ...]:
    """Static configuration with BitFLOPs closest to `target` (module docstring)."""
    k = len(net.choices)
    cfg = [0] * net.n_dynamic
    order = sorted(range(net.n_dynamic), key=lambda j: (-preference[j], j))
    best = tuple(cfg)
    for level in range(1, k):
        for j in order:
            if cfg[j] != level - 1:
                continue
            trial = list(cfg)
            trial[j] = level
            bf = net.config_bitflops(trial)
            if bf <= target:
                cfg = trial
                best = tuple(cfg)
            elif abs(bf - target) < abs(net.config_bitflops(best) - target):
                return tuple(trial)  # one step past the target is closer than staying below
            else:
                return best
    return best


def build_net(model: onnx.ModelProto, train_data: ImageDataset, config: DynamicConfig,
              pre: Preprocess) -> tuple[DynamicNet, onnx.ModelProto, float]:
    """The untrained DynamicNet of `config` (deterministic: calibration and `config.seed`), the fused graph
    it lifts, and the target BitFLOPs."""
    from qtool.fusion import is_fused, fuse, untie_biases
    from qtool.bitsearch.space import SearchSpace

    fused = untie_biases(model if is_fused(model) else fuse(model)[0])
    space = SearchSpace.from_model(fused, tuple(sorted(set(config.bits))), fix_first=8, fix_last=None)
    ranges = _calibrate(fused, space, train_data, pre, config.calib_size)
    torch.manual_seed(config.seed)
    net = DynamicNet(fused, config.bits, ranges, hidden=config.hidden, controller_conv=config.controller_conv,
                     controller_layers=config.controller_layers, granularity=config.granularity)
    kind, tv = parse_target(config.target)
    return net, fused, (uniform_bitflops(net, tv) if kind == "uniform" else tv)


def teacher_for(fused: onnx.ModelProto, config: DynamicConfig) -> torch.nn.Module | None:
    """The FP32 model, when config.distill asks for its soft labels."""
    return fp32_teacher(fused) if config.distill else None


def train_static(untrained: DynamicNet, cfg, label: str, train_data: ImageDataset, val_data: ImageDataset,
                 pre: Preprocess, config: DynamicConfig, target: float, teacher=None) -> tuple[dict, onnx.ModelProto]:
    """Static QAT of one configuration from a copy of `untrained` with the dynamic run's budget; its row
    (accuracy in PyTorch and of its QDQ model on onnxruntime) and that QDQ model."""
    from exporters.qdq import apply_plan

    s_net = copy.deepcopy(untrained).to(resolve_device(config.device))
    s_net.set_mode("fixed", fixed=cfg)
    hist = train(s_net, train_data, pre, config, target, f"static {label}", config.seed, teacher)
    s_net.cpu()
    ev = evaluate(s_net, val_data, pre)
    qdq = apply_plan(*s_net.export_config(cfg))
    lg = _ort_logits(qdq, val_data, pre, config.threads)
    return ({"name": label, "choice": [int(c) for c in cfg], "bits": s_net.config_bits(cfg),
             "bitflops": s_net.config_bitflops(cfg), "acc_torch": ev.acc,
             "acc_ort": float((lg.argmax(1) == val_data.labels).mean()), "history": hist}, qdq)


def shared_at(net: DynamicNet, val: ImageDataset, pre: Preprocess, cfg) -> float:
    """Accuracy of the dynamic net's shared weights with every image at configuration `cfg` (PyTorch).
    At the matched static configuration: static - this is what sharing the weights across K bit-widths
    costs, dynamic - this is what the routing earns. Leaves the net in mode "fixed"."""
    net.set_mode("fixed", fixed=cfg)
    return evaluate(net, val, pre).acc


@dataclass
class DynamicResult:
    report: dict
    out_dir: Path
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        r = self.report
        d = r["dynamic"]
        out = [f"dynamic ({'/'.join(map(str, r['bits']))} bits, target {r['target_bitflops']:.4g} BitFLOPs): "
               f"val acc PyTorch {d['acc_torch'] * 100:.2f}% (free argmax {d['acc_torch_argmax'] * 100:.2f}%), "
               f"onnxruntime {d['acc_ort'] * 100:.2f}% ({d['ort_minus_torch_pp']:+.2f} pp), "
               f"avg BitFLOPs {d['avg_bitflops']:.4g}, {d['codebook_size']} configurations deployed "
               f"(cover {d['codebook_coverage'] * 100:.1f}% of free-argmax choices)"]
        for s in r["static"]:
            out.append(f"static {s['name']} ({s['bitflops']:.4g} BitFLOPs): val acc PyTorch {s['acc_torch'] * 100:.2f}%, "
                       f"onnxruntime {s['acc_ort'] * 100:.2f}%")
        if r.get("acc_diff_pp") is not None:
            out.append(f"dynamic - static (matched) accuracy on onnxruntime: {r['acc_diff_pp']:+.2f} pp")
        out.append(f"the dynamic net's shared weights with every image at the matched configuration (PyTorch): "
                   f"{d['acc_torch_shared_at_matched'] * 100:.2f}%")
        ro = r["routing"]
        best = ro["best_single"]
        out.append(f"routing on onnxruntime: deployed {ro['deployed']['acc'] * 100:.2f}% vs the same configurations "
                   f"shuffled across images {ro['shuffled']['acc_mean'] * 100:.2f}% (what reading the image earns: "
                   f"{ro['routing_gain_pp']:+.2f} pp); an oracle router at the same BitFLOPs {ro['oracle']['acc'] * 100:.2f}%; "
                   + (f"best single deployed configuration within them {best['acc'] * 100:.2f}%" if best
                      else "no single deployed configuration within them"))
        for b in ("batch1", "batch64"):
            lat = r.get("latency", {}).get(b)
            if lat:
                out.append(f"latency {b}: dynamic {lat['dynamic_ms']:.3f} ms (controller {lat['controller_ms']:.3f}) "
                           f"vs static {lat['static_ms']:.3f} ms (x{lat['dynamic_over_static']:.2f})")
        out += [f"note: {n}" for n in self.notes]
        out.append(f"wrote {self.out_dir}/report.json, bitflops_hist.png, easy_hard.png, acc_vs_bitflops.png, "
                   "controller.onnx, configs/, static.onnx")
        return out


def _ort_logits(model: onnx.ModelProto, ds: ImageDataset, pre: Preprocess, threads: int) -> np.ndarray:
    from qtool.dynbits.runtime import ort_session

    s = ort_session(model, threads)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: pre.apply(ds.images[i:i + _EVAL_BATCH])})[0]
                           for i in range(0, len(ds), _EVAL_BATCH)])


def _calibrate(fused: onnx.ModelProto, space, ds: ImageDataset, pre: Preprocess, n: int) -> dict:
    from qtool.calibrate import collect_stats

    name, _ = model_image_input(fused)
    idx = np.sort(np.random.default_rng(_CALIB_SEED).permutation(len(ds))[:n])
    batches = [{name: pre.apply(ds.images[idx[i:i + 64]])} for i in range(0, len(idx), 64)]
    stats = collect_stats(fused, batches, list(space.groups))
    return {r: stats[r].range("minmax", signed=False) for r in space.groups}


def dynamic(model: onnx.ModelProto, train_data: ImageDataset, val_data: ImageDataset, config: DynamicConfig,
            out_dir: str | Path, preprocess: Preprocess | None = None) -> DynamicResult:
    """Train, compare, deploy and report (module docstring). Writes into `out_dir` (created)."""
    from qtool.dynbits import report as rep
    from qtool.dynbits.runtime import DynamicSession, latency, write_deployment
    from qtool.io import save_model

    if not isinstance(config, DynamicConfig):
        raise QtoolError(f"config must be a DynamicConfig, got {type(config).__name__}")
    t_start = time.perf_counter()
    out = Path(out_dir)
    pre = preprocess or resolve_preprocess(model)
    name, dims = model_image_input(model)
    check_input_matches(dims, train_data, name)
    if config.val_limit:
        val_data = val_data.subset(np.arange(min(config.val_limit, len(val_data))))
    notes: list[str] = []
    net, fused, target = build_net(model, train_data, config, pre)
    static_net = copy.deepcopy(net)  # same initial weights and quantizers for the static baseline
    static = [f"{l.node} at {l.bits} bits" for l in net.layers if l.dynamic is None]
    notes.append(f"the controller reads {net.tap!r}; {len(static)} layers are static ({', '.join(static)}); "
                 f"{net.n_dynamic} of {len(net.layers)} layers are dynamic")

    # -- dynamic training, codebook, deployed accuracy ----------------------------------------------
    net.to(resolve_device(config.device))
    teacher = teacher_for(fused, config)
    hist = train(net, train_data, pre, config, target, "dynamic", config.seed, teacher)
    n_classes = len(train_data.classes)
    collapsed = [collapse_note("dynamic", hist, n_classes, config.lr)]
    net.cpu()  # evaluation and export on the CPU: cuDNN's convolutions round differently from ORT's (qtool.device)
    net.set_mode("argmax")
    free = evaluate(net, val_data, pre)
    gen = torch.Generator().manual_seed(config.seed)
    pool = torch.randperm(len(train_data), generator=gen)[:config.train_limit].numpy() if config.train_limit \
        else np.arange(len(train_data))
    codebook, n_distinct = build_codebook(net, train_data, pre, np.sort(pool), config.max_configs)
    book = {tuple(c) for c in codebook.tolist()}
    coverage = float(np.mean([tuple(c) in book for c in free.configs.tolist()]))
    net.set_mode("codebook", codebook=codebook)
    dep = evaluate(net, val_data, pre)
    cfg_index = {tuple(c): i for i, c in enumerate(codebook.tolist())}
    dep_idx = np.array([cfg_index[tuple(c)] for c in dep.configs.tolist()])
    matched = matched_config(net, float(dep.bitflops.mean()), dep.configs.mean(0))
    acc_shared_matched = shared_at(net, val_data, pre, matched)
    net.set_mode("codebook", codebook=codebook)

    # -- deployment and ORT fidelity ----------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    manifest = write_deployment(net, codebook, out)
    sess = DynamicSession.load(out, threads=config.threads)
    ort_logits, ort_cfg = [], []
    for i in range(0, len(val_data), _EVAL_BATCH):
        ort_logits.append(sess.run(pre.apply(val_data.images[i:i + _EVAL_BATCH])))
        ort_cfg.append(sess.last_configs)
    ort_logits, ort_cfg = np.concatenate(ort_logits), np.concatenate(ort_cfg)
    acc_ort = float((ort_logits.argmax(1) == val_data.labels).mean())
    routing = routing_analysis(correctness(sess, pre.apply(val_data.images), val_data.labels, _EVAL_BATCH),
                               sess.bitflops, ort_cfg, seed=config.seed)
    dynamic_report = {
        "acc_torch": dep.acc, "acc_torch_argmax": free.acc, "acc_ort": acc_ort,
        "ort_minus_torch_pp": (acc_ort - dep.acc) * 100,
        "prediction_agreement": float((ort_logits.argmax(1) == dep.logits.argmax(1)).mean()),
        "config_agreement": float((ort_cfg == dep_idx).mean()),
        **{k: v for k, v in dep.summary().items() if k != "acc"},
        "avg_bitflops_argmax": float(free.bitflops.mean()),
        "mean_bits": float(np.mean([[net.choices[k] for k in c] for c in dep.configs])),
        "distinct_configs_argmax_train": n_distinct, "codebook_size": len(codebook), "codebook_coverage": coverage,
        "config_counts_val": np.bincount(dep_idx, minlength=len(codebook)).tolist(),
        "acc_torch_shared_at_matched": acc_shared_matched,
        "history": hist,
    }
    if coverage < 1.0:
        notes.append(f"{(1 - coverage) * 100:.1f}% of val samples' free-argmax configurations are outside the "
                     f"{len(codebook)}-entry codebook and run their best-scoring codebook entry instead")

    # -- static baselines -----------------------------------------------------------------------------
    statics = []
    static_model = None
    if config.static_baseline or config.uniform_baselines:
        todo = []
        if config.static_baseline:
            todo.append(("matched", matched))
        if config.uniform_baselines:
            todo += [(f"uniform{b}", net.uniform(b)) for b in net.choices]
        for label, cfg in todo:
            row, qdq = train_static(static_net, cfg, label, train_data, val_data, pre, config, target, teacher)
            collapsed.append(collapse_note(f"static {label}", row["history"], n_classes, config.lr))
            statics.append(row)
            if label == "matched" or static_model is None:
                static_model = qdq
                save_model(qdq, out / "static.onnx")
    if static_model is None:  # latency reference: the most used deployed configuration
        static_model = onnx.load(str(out / manifest["configs"][int(np.bincount(dep_idx).argmax())]["file"]))

    notes += [n for n in collapsed if n]
    report = {
        "version": 1, "bits": list(net.choices), "penalty": config.penalty, "alpha": config.alpha,
        "target_bitflops": target, "target_mean_bits": _target_bits(net, target), "config": asdict(config),
        "train_images": int(len(pool)), "val_images": len(val_data), "total_macs": net.total_macs,
        "uniform_bitflops": {str(b): net.config_bitflops(net.uniform(b)) for b in net.choices},
        "layers": [{"node": l.node, "op": l.op, "macs": l.macs, "dynamic": l.dynamic is not None,
                    "option_share": (np.bincount(dep.configs[:, l.dynamic], minlength=len(net.choices))
                                     / len(dep.configs)).tolist() if l.dynamic is not None else None}
                   for l in net.layers],
        "dynamic": dynamic_report, "routing": routing, "static": statics,
        "acc_diff_pp": next(((acc_ort - s["acc_ort"]) * 100 for s in statics if s["name"] == "matched"), None),
        "codebook": manifest["configs"],
        "training_cost": {"dynamic_s_per_epoch": float(np.mean([h["seconds"] for h in hist])),
                          "static_s_per_epoch": float(np.mean([h["seconds"] for s in statics for h in s["history"]]))
                          if statics else None,
                          "note": f"dynamic training computes all {len(net.choices)} branches of every dynamic layer "
                                  "(about K x the conv cost of static QAT)"},
    }
    if config.latency:
        big = val_data.images[np.arange(64) % len(val_data)]
        report["latency"] = latency(sess, static_model, pre.apply(big), runs=config.latency_runs,
                                    threads=config.threads)
        report["latency"]["note"] = ("dynamic = controller (with its own copy of the stem) + one QDQ model run per "
                                     "configuration group in the batch; static = one QDQ model; onnxruntime CPU EP")
    report["notes"] = notes
    report["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    rep.write_report(out, report, val_data, dep)
    return DynamicResult(report, out, notes)
