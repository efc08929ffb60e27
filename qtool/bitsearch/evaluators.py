"""Evaluators: candidate -> validation accuracy (and, for the front, tuned weights + plan).

An evaluator is prepared once in the main process (`prepare`: load data, train the supernet), then
pickled to the executor's workers, where `evaluate(candidate)` runs. Three are provided:

- `QATEvaluator` ("qat"): a short QAT fine-tune of each candidate from the FP32 weights by `qtool qat`'s
  own code (`qtool.qat_model.qat_finetune`, the candidate's bits as plan bits; `steps` x `batch_size`
  images, SGD + cosine), validation. Costly, faithful.
- `PTQEvaluator` ("ptq"): each candidate as plain PTQ, scored on onnxruntime; no training (its docstring).
- `SupernetEvaluator` ("supernet"): ONE shared-weight multi-bit QAT model trained once, then each
  candidate costs a BN re-calibration (a few calibration batches in train mode, see
  `qtool.bitsearch.supernet`) and one validation pass: seconds. Training uses the sandwich rule
  (Yu & Huang 2019, BigNAS): every step accumulates the gradients of the largest configuration
  (all 8-bit; target cpu: all float), the smallest (all 2-bit; cpu: all w4a8) and `n_random`
  configurations with a bit-width drawn per layer uniformly, one optimizer step for all; with
  `distill` the others learn from the largest one's soft output (in-place distillation). Per-layer uniform sampling alone almost never draws a
  configuration near all-8-bit (3^-36 on ResNet-20), so the shared weights drift towards the
  low-bit paths. Measured on ResNet-20 / CIFAR-10 (1000 validation images; Kendall tau against 14
  candidates each fine-tuned 60 steps), lr 0.01 and ~360 forward/backward passes each: uniform
  sampling scores W8A8 80.1% < W4A4 81.7% (tau 0.60), the sandwich 83.1% > 79.9% > W2A2 65.5%
  (tau 0.95); at lr 0.002 the 8-bit end stays higher, 85.3% > 81.5% > 67.0% (tau 0.93; 264 steps:
  85.4% > 82.6% > 69.5%, tau 1.00). In-place distillation gave no ranking gain there (tau 0.89),
  so it is off by default. Training all-2-bit every step makes 2-bit weights look nearly free
  (527 steps, 1000 images: W2A8 84.1% vs W4A8 84.4%), which fine-tunes do not confirm;
  `sandwich_low=4` (the small end all-4-bit; 2 bits still come up in the random draws) scores
  W8A8 87.3% > W4A8 87.1% > W2A8 84.5%, W4A4 85.1% > W2A2 65.5% (benchmarks/search.py).

Both train a lifted graph (`qtool.lift`) with fake-quant at the points of `qtool.quant_points`, stepped
by `qtool.trainloop.train_loop`; their accuracy is the accuracy of the exported QDQ model on
onnxruntime (the supernet's up to float rounding; the search checks it on the front).
`QATEvaluator(init_from=..., finetune=...)` starts each candidate from a trained supernet instead and
takes any `finetune(qnet, data, candidate, steps, ...)` for it. `rank_correlation` reports Kendall's
tau between two evaluators on a sample of candidates (is the supernet ranking the QAT ranking?).
"""
from __future__ import annotations

import copy
import io
import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

from qtool.device import check_device, resolve_device
from qtool.distill import distill_loss, fp32_teacher, soft_labels
from qtool.qat_config import check_weight
from qtool.data import ImageDataset, check_input_matches, load_dataset, model_image_input, step_batches, SPLIT_SEED
from qtool.errors import QtoolError
from qtool.io import atomic_write_bytes
from qtool.plan import QuantPlan
from qtool.preprocess import Preprocess, resolve_preprocess
from qtool.ptq import QuantConfig, build_plan, calibration_stats
from qtool.bitsearch.space import FLOAT, Candidate, SearchSpace
from qtool.bitsearch.supernet import QuantNet
from qtool.trainloop import train_loop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchData:
    """The search's data: the train and val splits (`qtool.data.ImageDataset`, the one data set type),
    the calibration images and the model's preprocessing (applied per batch)."""
    train: ImageDataset
    val: ImageDataset
    calib_images: np.ndarray
    pre: Preprocess
    augment: bool

    @classmethod
    def load(cls, model: onnx.ModelProto, spec: str, *, train_limit: int | None = None, val_limit: int | None = None,
             calib_size: int = 256) -> "SearchData":
        train, val = load_dataset(spec, "train"), load_dataset(spec, "val")
        name, dims = model_image_input(model)
        check_input_matches(dims, train, name)
        rng = np.random.default_rng(SPLIT_SEED + 2)
        if train_limit is not None:
            if train_limit < 1:
                raise QtoolError(f"--train-limit must be >= 1, got {train_limit}")
            train = train.subset(np.sort(rng.permutation(len(train))[:train_limit]))
        if val_limit is not None:
            if val_limit < 1:
                raise QtoolError(f"--val-limit must be >= 1, got {val_limit}")
            val = val.subset(np.arange(min(val_limit, len(val))))
        # In random order, not sorted: a training set stored class by class (CIFAR from folders) would give
        # one- or few-class calibration batches, and BN re-calibration normalizes by per-batch statistics
        # (on ResNet-20, single-class batches cost uniform W8A8 over 10 points of supernet accuracy).
        calib = train.images[np.random.default_rng(SPLIT_SEED + 3).permutation(len(train))[:calib_size]]
        c, h = train.shape[0], train.shape[1]
        return cls(train, val, calib, resolve_preprocess(model), augment=(c == 3 and h >= 16))

    def x(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.pre.apply(images))

    def calib_feeds(self, input_name: str, batch_size: int = 64) -> list[dict[str, np.ndarray]]:
        """The calibration images, preprocessed, as onnxruntime feeds of `input_name`."""
        return [{input_name: self.pre.apply(self.calib_images[i:i + batch_size])}
                for i in range(0, len(self.calib_images), batch_size)]

    def calib_batches(self, n: int, batch_size: int) -> list[torch.Tensor]:
        return [self.x(self.calib_images[i:i + batch_size]) for i in range(0, min(n * batch_size, len(self.calib_images)),
                                                                            batch_size)]


@torch.no_grad()
def correct_images(net: nn.Module, data: SearchData, batch_size: int = 500) -> np.ndarray:
    """Whether each validation image is classified right (bool), always computed on the CPU (a copy
    of a CUDA net): cuDNN's float convolutions round differently from onnxruntime's, which moves
    fake-quant values across rounding boundaries (see qtool.device)."""
    if next(net.parameters()).device.type != "cpu":
        net = copy.deepcopy(net).cpu()
    net.eval()
    val = data.val
    return np.concatenate([net(data.x(val.images[i:i + batch_size])).argmax(1).numpy()
                           == val.labels[i:i + batch_size] for i in range(0, len(val), batch_size)])


def accuracy(net: nn.Module, data: SearchData, batch_size: int = 500) -> float:
    """Validation top-1 (on the CPU, see `correct_images`)."""
    return float(correct_images(net, data, batch_size).mean())


def train_steps(qnet: QuantNet, data: SearchData, steps: int, *, batch_size: int, lr: float, seed: int,
                sample: Callable[[np.random.Generator], Candidate | list[Candidate]],
                on_step: Callable[[int, float], None] | None = None, weight_decay: float = 1e-4,
                distill: bool = False, teacher: nn.Module | None = None, teacher_weight: float = 0.0) -> None:
    """SGD (Nesterov, cosine schedule) over random batches; `sample` picks each step's bit-widths.

    `sample` may return several candidates: their losses on the same batch are averaged (gradients
    accumulated, one optimizer step), e.g. the sandwich rule. `distill`: the first candidate (the
    largest, in the sandwich) learns from the labels, the others from its detached softmax (in-place
    distillation, Yu et al. 2020). `teacher` (e.g. the FP32 model) with `teacher_weight` w: the labels'
    loss becomes (1 - w) CE(labels) + w CE(teacher's softmax), knowledge distillation at temperature 1.
    """
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    decay = [p for p in qnet.model_parameters() if p.dim() > 1]
    no_decay = [p for p in qnet.model_parameters() if p.dim() <= 1] + qnet.quant_parameters()
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    device = qnet.device
    teacher = teacher.to(device).eval() if teacher is not None and teacher_weight else None

    def loss_fn(x, y):
        # One backward per configuration (each graph freed before the next runs), one optimizer step.
        cands = sample(rng)
        cands = [cands] if isinstance(cands, Candidate) else list(cands)
        target, total = None, 0.0
        soft = soft_labels(teacher, x) if teacher is not None else None
        for c in cands:
            qnet.set_candidate(c)
            out = qnet(x)
            if target is None:
                loss = distill_loss(out, y, soft, teacher_weight)
                if distill:
                    target = F.softmax(out.detach(), dim=1)
            else:
                loss = F.cross_entropy(out, target)  # soft targets: KL up to the teacher's entropy
            (loss / len(cands)).backward()
            total += float(loss.detach()) / len(cands)
        return None, total

    train_loop(qnet, step_batches(data.train, steps, batch_size, data.pre, gen, data.augment), loss_fn, [opt], sched,
               device=device, on_step=on_step, backward=False)
    qnet.eval()


def default_finetune(qnet: QuantNet, data: SearchData, candidate: Candidate, steps: int, *, batch_size: int,
                     lr: float, seed: int, teacher: nn.Module | None = None, teacher_weight: float = 0.0) -> None:
    train_steps(qnet, data, steps, batch_size=batch_size, lr=lr, seed=seed, sample=lambda rng: candidate,
                teacher=teacher, teacher_weight=teacher_weight)


class Evaluator:
    """Interface (see the module docstring). Subclasses set `name` and implement `_score`."""
    name = ""

    def __init__(self, *, recal_batches: int = 4, recal_batch_size: int = 64, threads: int | None = 1,
                 device: str = "cpu"):
        # threads=1: on a shared 2-core machine torch's second thread spins against other jobs
        # (measured 20-30x slower per op here); parallelism comes from the executor's workers.
        self.recal_batches, self.recal_batch_size, self.threads = recal_batches, recal_batch_size, threads
        check_device(device)  # validated here, in the main process, before any work
        self.device = device
        self.fused: onnx.ModelProto | None = None
        self.space: SearchSpace | None = None
        self.data: SearchData | None = None
        self.seed = 0

    def settings(self) -> dict:
        """What the scores depend on: a resumed search with other settings cannot reuse the log."""
        return {"evaluator": self.name, "recal_batches": self.recal_batches, "recal_batch_size": self.recal_batch_size}

    def prepare(self, fused: onnx.ModelProto, space: SearchSpace, data: SearchData, *, workdir: Path | None = None,
                seed: int = 0, progress=None) -> None:
        self.fused, self.space, self.data, self.seed = fused, space, data, seed
        if self.threads:
            torch.set_num_threads(self.threads)

    def _recal(self) -> list[torch.Tensor]:
        return self.data.calib_batches(self.recal_batches, self.recal_batch_size)

    def tuned(self, c: Candidate) -> QuantNet:
        raise NotImplementedError

    def evaluate(self, c: Candidate) -> float:
        """Validation top-1 of candidate `c` (in a worker; deterministic for a given candidate)."""
        return float(self.correct(c).mean())

    def correct(self, c: Candidate) -> np.ndarray:
        """Each validation image's correctness under candidate `c` (bool), e.g. for paired comparisons."""
        if self.threads:
            torch.set_num_threads(self.threads)
        resolve_device(self.device)  # a spawned worker starts with torch's defaults (TF32 on CUDA)
        return correct_images(self.tuned(c), self.data)

    def materialize(self, c: Candidate) -> tuple[onnx.ModelProto, "object", float]:
        """(fused model with the candidate's weights, calibrated QuantPlan, torch accuracy)."""
        net = self.tuned(c)
        acc = accuracy(net, self.data)
        model, plan = (net if net.device.type == "cpu" else copy.deepcopy(net).cpu()).export(c)
        return model, plan, acc


class QATEvaluator(Evaluator):
    """Each candidate fine-tuned by `qtool qat`'s own code (`qtool.qat_model.qat_finetune`: the same
    quantizers, bias rounding, training loop and export as `qtool qat --plan`, with the candidate's
    per-tensor bits as the plan's bits), `steps` optimizer steps of `batch_size` images at `lr`
    (SGD + cosine, qat's LSQ). Its eval mode emulates onnxruntime's integer kernels as qat's does, so
    a candidate's score is the accuracy of its exported QDQ model. The activation statistics qat
    calibrates its quantizers from depend on the FP32 graph only: computed once in `prepare`.

    With `init_from` (a trained supernet) a candidate instead inherits the supernet's `QuantNet` (its
    shared weights, learned steps and norms) and is fine-tuned as the supernet trains, by `finetune`
    (default: `train_steps` on that candidate), then BN re-calibrated."""
    name = "qat"

    def __init__(self, *, steps: int = 100, batch_size: int = 64, lr: float = 0.01, finetune=None,
                 init_from: str | Path | None = None, distill: float = 0.0, loss: str = "auto", **kw):
        """init_from: None = the FP32 weights with fresh quantizers; or a trained supernet checkpoint
        (`supernet.pt` of a search workdir, same model and space): every candidate inherits its shared
        weights, learned quantizer steps and norms (weight inheritance, as in OFA / BigNAS).
        finetune: with init_from, `finetune(qnet, data, candidate, steps, *, batch_size, lr, seed)` replaces
        the supernet-style fine-tune. distill: weight in [0, 1] of the FP32 model's soft labels in the
        fine-tune's loss (knowledge distillation; `finetune` then also gets `teacher=` and `teacher_weight=`).
        loss: the fine-tunes' QATConfig.loss (FP32 init only): auto | ce | distill (every output against
        the FP32 model's, no labels used)."""
        super().__init__(**kw)
        from qtool.qat_config import LOSSES

        if loss not in LOSSES:
            raise QtoolError(f"qat evaluator: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if loss != "auto" and init_from is not None:
            raise QtoolError("qat evaluator: loss applies to fine-tunes from the FP32 weights (qtool qat's), "
                             "not to candidates inherited from a supernet (init_from)")
        self.loss = loss
        if steps < 0 or batch_size < 1 or not lr > 0:
            raise QtoolError("qat evaluator: steps must be >= 0, batch size >= 1, lr > 0")
        self.distill = check_weight(distill, "qat evaluator: distill")
        if init_from is not None and not Path(init_from).is_file():
            raise QtoolError(f"qat evaluator: supernet checkpoint not found: {init_from}")
        if finetune is not None and init_from is None:
            raise QtoolError("qat evaluator: finetune= applies to candidates inherited from a supernet (init_from); "
                             "from the FP32 weights the fine-tune is qtool qat's")
        self.steps, self.batch_size, self.lr = steps, batch_size, lr
        self.init_from = None if init_from is None else str(init_from)
        self.finetune = finetune or default_finetune
        self._base: QuantNet | None = None
        self._stats: dict | None = None  # FP32 activation statistics, qat's calibration (FP32 init only)
        self._teacher: nn.Module | None = None  # lifted once per process, on the first distilled fine-tune

    def settings(self) -> dict:
        out = {**super().settings(), "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
               "init": "fp32" if self.init_from is None else "supernet"}
        if self.init_from is None:  # scores of the QuantNet fine-tune this replaced are not comparable
            out["finetune"] = "qtool.qat"
        if self.distill:  # only when set: workdirs from before the option still resume
            out["distill"] = self.distill
        if self.loss != "auto":  # likewise
            out["loss"] = self.loss
        return out

    def prepare(self, fused, space, data, *, workdir=None, seed=0, progress=None):
        super().prepare(fused, space, data, workdir=workdir, seed=seed)
        if self.init_from is None:
            from qtool.qat_model import calibrate_activations

            self._stats = calibrate_activations(fused, data.train, data.pre, self._config(space.ends()[0]).calib_size)
            return
        self._base = QuantNet(fused, space, data.x(data.calib_images))
        try:
            saved = torch.load(self.init_from, map_location="cpu", weights_only=True)  # tensors only
            self._base.load_state_dict(saved["state"])
        except Exception as e:
            raise QtoolError(f"cannot start from the supernet {self.init_from}: {str(e).splitlines()[0]}") from None

    def _config(self, c: Candidate):
        from qtool.qat_config import QATConfig

        return QATConfig(plan_bits=tuple(self.space.quantized_bits(c).items()), algo="lsq", steps=self.steps,
                         batch_size=self.batch_size, lr=self.lr, seed=c.seed(self.seed), device=self.device,
                         distill=self.distill, loss=self.loss, quiet=True,
                         meta={"producer": "qtool.search", "candidate": c.key})

    def _teacher_once(self) -> nn.Module | None:
        wanted = self.distill or self.loss == "distill"  # auto resolves to ce on the labeled data searched
        if wanted and self._teacher is None:
            self._teacher = fp32_teacher(self.fused)
        return self._teacher if wanted else None

    def _qat(self, c: Candidate):
        from qtool.qat_model import qat_finetune

        return qat_finetune(self.fused, self.data.train, self._config(c), self.data.pre, stats=self._stats,
                            teacher=self._teacher_once())

    def _quantizes_nothing(self, c: Candidate) -> bool:
        """All float (target cpu, no fixed layers): the FP32 model itself, which qat cannot express as plan bits."""
        return self.init_from is None and not self.space.quantized_bits(c)

    def tuned(self, c: Candidate) -> nn.Module:
        if self._quantizes_nothing(c):
            return fp32_teacher(self.fused)
        if self.init_from is None:
            return self._qat(c).lifted
        net = copy.deepcopy(self._base).to(resolve_device(self.device))
        teacher = self._teacher_once()
        kd = {"teacher": teacher, "teacher_weight": self.distill} if self.distill else {}
        self.finetune(net, self.data, c, self.steps, batch_size=self.batch_size, lr=self.lr, seed=c.seed(self.seed),
                      **kd)
        net.set_candidate(c)
        net.recalibrate(self._recal())
        return net

    def materialize(self, c: Candidate) -> tuple[onnx.ModelProto, "object", float]:
        if self.init_from is not None:
            return super().materialize(c)
        if self._quantizes_nothing(c):
            return self.fused, QuantPlan(meta={"producer": "qtool.search", "candidate": c.key}), accuracy(
                fp32_teacher(self.fused), self.data)
        qm = self._qat(c)
        acc = accuracy(qm.lifted, self.data)
        model, plan = qm.to_plan({"producer": "qtool.search", "candidate": c.key, "finetune": "qtool.qat"})
        return model, plan, acc


class SupernetEvaluator(Evaluator):
    name = "supernet"
    CHECKPOINT = "supernet.pt"

    def __init__(self, *, epochs: float = 1.0, steps: int | None = None, batch_size: int = 64, lr: float = 0.01,
                 sandwich: bool = True, sandwich_low: int | None = None, n_random: int = 1, distill: bool = False,
                 **kw):
        """epochs/steps: optimizer steps (epochs x train images / batch_size); with `sandwich` each step
        costs 2 + n_random forward/backward passes, without it one (a single random configuration).
        `sandwich_low`: the bit-width of the sandwich's small end (default: the smallest choice). Training
        all-2-bit every step over-trains the 2-bit paths: the supernet then scores 2-bit weights as nearly
        free, which fine-tunes do not confirm (see benchmarks/search.py)."""
        super().__init__(**kw)
        if (steps is not None and steps < 1) or not epochs > 0 or batch_size < 1 or not lr > 0:
            raise QtoolError("supernet evaluator: epochs/steps must be > 0, batch size >= 1, lr > 0")
        if n_random < 0 or (not sandwich and n_random < 1):
            raise QtoolError("supernet evaluator: n_random must be >= 0 (>= 1 without the sandwich rule)")
        self.epochs, self.steps, self.batch_size, self.lr = epochs, steps, batch_size, lr
        if sandwich_low is not None and not sandwich:
            raise QtoolError("supernet evaluator: sandwich_low needs the sandwich rule")
        self.sandwich, self.sandwich_low, self.n_random, self.distill = sandwich, sandwich_low, n_random, distill
        self.net: QuantNet | None = None
        self.train_seconds = 0.0

    def settings(self) -> dict:
        out = {**super().settings(), "epochs": self.epochs, "steps": self.steps, "batch_size": self.batch_size,
               "lr": self.lr, "sandwich": self.sandwich, "n_random": self.n_random, "distill": self.distill}
        if self.sandwich_low is not None:  # only when set: workdirs from before the option still resume
            out["sandwich_low"] = self.sandwich_low
        return out

    def n_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, round(self.epochs * len(self.data.train) / self.batch_size))

    def sampler(self, space: SearchSpace) -> Callable[[np.random.Generator], list[Candidate]]:
        """Each step's configurations: [largest, smallest] + n_random random ones (sandwich rule), or
        n_random random ones; a random one draws every gene uniformly (so every bit-width keeps training
        when `sandwich_low` lifts the small end)."""
        ends = list(space.ends(self.sandwich_low)) if self.sandwich else []

        def sample(rng: np.random.Generator) -> list[Candidate]:
            return ends + [space.decode(space.random_genes(rng)) for _ in range(self.n_random)]

        return sample

    def prepare(self, fused, space, data, *, workdir=None, seed=0, progress=None):
        import time

        super().prepare(fused, space, data, workdir=workdir, seed=seed)
        net = QuantNet(fused, space, data.x(data.calib_images)).to(resolve_device(self.device))
        ck = Path(workdir) / self.CHECKPOINT if workdir is not None else None
        meta = {"settings": self.settings(), "seed": seed, "space": space.describe()}
        if ck is not None and ck.exists():
            try:
                saved = torch.load(ck, map_location="cpu", weights_only=True)  # our own file; tensors only
            except Exception as e:
                raise QtoolError(f"cannot read the supernet checkpoint {ck}: {str(e).splitlines()[0]}") from None
            if json.loads(saved["meta"]) != json.loads(json.dumps(meta)):
                raise QtoolError(f"{ck} was trained with other settings; use a new --workdir")
            net.load_state_dict(saved["state"])
            self.train_seconds = float(saved.get("train_seconds", 0.0))
            log.info("loaded the trained supernet from %s", ck)
        else:
            steps = self.n_steps()
            # Most aggressive first, the order the grid's supernet always initialized its quantizers in.
            uniform = [c for _, c in reversed(space.uniform_members())]
            net.init_quantizers(data.calib_batches(1, self.recal_batch_size)[0], uniform)
            task = progress.add_task("train supernet", total=steps, info="") if progress is not None else None

            def on_step(i, loss):
                if progress is not None:
                    progress.update(task, advance=1, info=f"loss {loss:.3f}")

            t0 = time.perf_counter()
            train_steps(net, data, steps, batch_size=self.batch_size, lr=self.lr, seed=seed, sample=self.sampler(space),
                        on_step=on_step, distill=self.distill and self.sandwich)
            self.train_seconds = time.perf_counter() - t0
            if ck is not None:
                buf = io.BytesIO()
                torch.save({"state": net.state_dict(), "meta": json.dumps(meta), "train_seconds": self.train_seconds}, buf)
                atomic_write_bytes(ck, buf.getvalue())
        self.net = net

    def tuned(self, c: Candidate) -> QuantNet:
        self.net.set_candidate(c)
        self.net.recalibrate(self._recal())  # running stats are reset first: order-independent
        return self.net


class PTQEvaluator(Evaluator):
    """Each candidate as plain post-training quantization, scored on onnxruntime.

    One calibration (`qtool.ptq.calibration_stats`, `qtool quantize`'s, with its QuantConfig), then per
    bit-width the plan `build_plan` gives (weights at w bits with the config's 8-bit activations, for the
    kernel pair bound; activations at a bits). A candidate's plan takes each tensor the search space
    quantizes from the plan of its bits and leaves the float ones out, which is what `--max-drop` builds for
    a choice of units. Its QDQ model (`exporters.qdq.apply_plan`) is scored on the validation images on
    onnxruntime: no training, and the searched accuracy is the deployed one (the front's re-check on
    onnxruntime gives the same number). Seconds per candidate; the accuracy a PTQ of those bits can reach,
    not what a fine-tune would (evaluators "supernet" / "qat").
    """
    name = "ptq"

    def __init__(self, *, config: QuantConfig | None = None, threads: int | None = 1, device: str = "cpu"):
        super().__init__(threads=threads, device=device)
        self.config = config or QuantConfig()
        self.weight_plans: dict[int, dict] = {}
        self.act_plans: dict[int, dict] = {}

    def settings(self) -> dict:
        return {"evaluator": self.name, "config": asdict(self.config)}

    def prepare(self, fused: onnx.ModelProto, space: SearchSpace, data: SearchData, *, workdir: Path | None = None,
                seed: int = 0, progress=None) -> None:
        super().prepare(fused, space, data, workdir=workdir, seed=seed)
        stats, exclude = calibration_stats(fused, data.calib_feeds(model_image_input(fused)[0]), self.config,
                                           all_activations=True)
        w_bits, a_bits = set(), set()
        for root, opts in space.group_bit_options().items():
            (w_bits if root in space.weights else a_bits).update(b for b in opts if b != FLOAT)
        cfg = self.config
        self.weight_plans = {b: build_plan(fused, replace(cfg, weight_bits=b), stats, exclude).tensors for b in w_bits}
        self.act_plans = {b: build_plan(fused, replace(cfg, act_bits=b), stats, exclude).tensors for b in a_bits}

    def plan(self, c: Candidate) -> QuantPlan:
        plan = QuantPlan(meta={"producer": "qtool.search (ptq)", "candidate": c.key, "config": asdict(self.config)})
        for t, b in self.space.quantized_bits(c).items():
            tq = (self.weight_plans if t in self.space.weights else self.act_plans)[b].get(t)
            if tq is not None:  # absent: excluded by the config or held inf / NaN in calibration
                plan.tensors[t] = tq
        return plan

    def correct(self, c: Candidate) -> np.ndarray:
        from exporters.qdq import apply_plan
        from qtool.bitsearch.report import ort_correct

        plan = self.plan(c)
        return ort_correct(apply_plan(self.fused, plan) if plan.tensors else self.fused, self.data, self.threads)

    def materialize(self, c: Candidate) -> tuple[onnx.ModelProto, QuantPlan, float]:
        return self.fused, self.plan(c), self.evaluate(c)


def rank_correlation(candidates: list[Candidate], a: Evaluator, b: Evaluator) -> dict:
    """Kendall's tau between two prepared evaluators' accuracies on `candidates` (scipy.stats.kendalltau)."""
    from scipy.stats import kendalltau

    sa = [a.evaluate(c) for c in candidates]
    sb = [b.evaluate(c) for c in candidates]
    res = kendalltau(sa, sb)
    return {"tau": float(res.statistic), "p_value": float(res.pvalue), "n": len(candidates),
            "candidates": [c.key for c in candidates], a.name or "a": sa, (b.name or "b") + ("_b" if a.name == b.name else ""): sb}


def make_evaluator(name: str, **kw) -> Evaluator:
    if name == "supernet":
        return SupernetEvaluator(**kw)
    if name == "qat":
        return QATEvaluator(**kw)
    if name == "ptq":
        return PTQEvaluator(**kw)
    raise QtoolError(f"unknown evaluator {name!r}; choose supernet, qat or ptq")
