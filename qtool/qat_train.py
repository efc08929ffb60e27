"""Quantization-aware training on the ONNX graph (`qtool qat`).

    result = qat(model, train_ds, val_ds, QATConfig(weight_bits=4, act_bits=4, algo="lsq", epochs=2))
    result.model   # QDQ ONNX model (runs on stock onnxruntime)
    result.plan    # QuantPlan with the learned scales / zero points
    result.fused   # the fused float graph with the tuned (fake-quantized) weights, node names unchanged

Flow: fuse -> mark tensors and build the plan skeleton exactly as PTQ does (build_plan: same QDQ
placement) -> calibrate the activations on onnxruntime (minmax) -> lift the graph to PyTorch ->
one fake-quant per plan tensor (set_quantizer / set_weight_quantizer; a pass-through tensor reuses
the quantizer of the tensor it shares parameters with; biases get the int32 rounding that the
exported DequantizeLinear applies) -> train -> read every quantizer's qparams() into a QuantPlan
-> write the weights back, each replaced by its fake-quantized value -> apply_plan.
In code (qtool.qat_model; the bits come from qtool.qat_bits.resolve_bits): `run_qat` = `build_qat_model`
(up to the quantizers) -> `train_qat` (qtool.trainloop's loop; `epochs`, or exactly `steps` steps) ->
`QATModel.to_plan` (tuned graph + plan) -> `QATModel.install_exact_eval`.
`qat` adds the per-epoch validation and the onnxruntime fidelity check with its gate (`fidelity_failure`:
> 1 quantization step on an output or < 99 % argmax agreement raises, unless `accept_fidelity`);
`qat_finetune` is the same run without them, which the search's `--eval qat` evaluator calls per candidate.

Data and loss: an ImageDataset (images + labels) or a FeedSet (any inputs, labels optional; qtool.qat_data).
`QATConfig.loss` "ce" trains on labels; "distill" trains every output against the FP32 model's (no labels;
qtool.distill has the per-output KL / MSE rule); "auto" picks ce with labels and one class-score output.

Fidelity (docs/DESIGN.md). Every exported weight is the fake-quant output `code * scale` (float32), so
the QDQ insertion recovers exactly the codes the torch model used, whatever the algorithm (DoReFa
and BNN transform the weight before quantizing: a QDQ on the raw weight would not reproduce them).
Activations use onnxruntime's QDQ numerics (qtool.fakequant); a sub-8-bit activation is exported
as Q -> integer Clip of the codes -> DQ, so ORT still runs integer kernels.
What remained was float accumulation order vs the kernels' exact integer sums re-rounding at ties;
after training the module's eval mode runs the quantized Conv/Gemm/Add/GlobalAveragePool as
onnxruntime's kernels compute them (qtool.ortexact), so its logits equal ORT's bit for bit.

Algorithms (activations / weights; all start from the PTQ minmax calibration):
- minmax: activations keep a running min/max; ema: exponential moving averages (Jacob et al.
  2018). Weights: symmetric per-channel scale of the current weight.
- lsq: learned step sizes (Esser et al. 2020). An activation whose calibrated range is not
  non-negative keeps its PTQ zero point fixed while the scale is learned, so signedness and QDQ
  types stay those of PTQ (uint8 activations).
- pact: PACT's learned clip alpha (Choi et al. 2018), initialized at the calibrated max; weights
  DoReFa as in the PACT paper.
- dorefa: DoReFa weights; activations clipped to a fixed [0, calibrated max] (DoReFa's [0, 1] clip
  would cut a trained float model's activations).
- bnn: binary weights sign(w) * mean|w| per channel (codes +-1: a 2-bit narrow range in the plan)
  for the weights at the uniform bits; weights with bits of their own (first/last policy, rules,
  plans) use the minmax weight quantizer at those bits. Activations as ema at their bits.
PACT / DoReFa quantize [0, alpha] only: tensors with negative values (the input image, residual
branches) use the ema observer instead; `result.notes` lists them.
DoReFa weights here are per output channel and rescaled by the channel's initial max|w|: with BN
folded there is no BatchNormalization left to absorb DoReFa's [-1, 1] weight range.

BatchNormalization (`bn`, the BN strategy of qtool.bn_strategy: "unfold", the default, or "fold":
train the fused graph). With "unfold", given an unfused model, a Conv whose output only a BN reads
trains as Conv->BN, with the fake-quant on the folded weight w * gamma / sqrt(running_var + eps): until
`freeze_bn` steps the quantized conv's output is divided by the fold factor and normalized with
batch statistics, which also update the running ones (PyTorch's ConvBn QAT; MindSpore's
Conv2dBnFoldQuant gets the same batch statistics from a second, float conv); afterwards and in
eval it is exactly the folded conv that is exported (Jacob et al. 2018, fig. C.8).
When the unfused graph does not map onto the fused one (other folds changed weights), training
runs on the fused graph and a note says so.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from exporters.qdq import apply_plan
from qtool.code_trace import code_divergence, first_divergence
from qtool.data import ImageDataset, check_input_matches, model_image_input
from qtool.errors import QtoolError
from qtool.plan import QuantPlan
from qtool.preprocess import Preprocess, resolve_preprocess
from qtool.qat_bits import TensorSpec, resolve_bits  # part of this module's API (tests, callers of qtool qat)
from qtool.qat_config import QATConfig
from qtool.qat_data import QATData, eval_feeds, labels_of
from qtool.qat_model import QATObjective, run_qat
from qtool.distill import distill_objective
from qtool.trainloop import EpochMeter, forward

log = logging.getLogger(__name__)

__all__ = ["qat", "QATConfig", "QATResult", "TensorSpec", "resolve_bits", "measure_fidelity", "fidelity_failure"]

_EVAL_BATCH = 256
_TRACE_BATCH = 8  # val samples the failed gate traces tensor by tensor


GATE_STEPS = 1.0  # fake-quant vs onnxruntime: at most this many quantization steps on any output
GATE_ARGMAX = 0.99  # and this argmax agreement on every class-score output


@dataclass
class QATResult:
    model: onnx.ModelProto  # QDQ model
    plan: QuantPlan
    fused: onnx.ModelProto  # fused float graph with the tuned, fake-quantized weights
    history: list[dict]  # per epoch (epoch 0 = after calibration, before training)
    fidelity: dict  # fake-quant vs onnxruntime on the val split (per output under "outputs")
    module: nn.Module | None = None  # the trained fake-quant PyTorch model (eval mode, CPU)
    notes: list[str] = field(default_factory=list)  # fallbacks and choices a user should know about
    bn_fold: bool = False  # Conv->BN pairs trained unfolded (QATConfig.bn "unfold" and a graph it applies to)
    device: str = "cpu"
    wall_time_s: float = 0.0
    loss: str = "ce"  # the loss it trained with (QATConfig.loss resolved): ce | distill

    def save(self, path: str | Path, plan_path: str | Path | None = None) -> None:
        from qtool.io import save_model

        save_model(self.model, path)
        if plan_path is not None:
            self.plan.save(plan_path)

    def lines(self) -> list[str]:
        f = self.fidelity
        out = []
        for h in self.history:
            parts = []
            if h.get("val_acc") is not None:
                parts.append(f"val acc (fake-quant) {h['val_acc'] * 100:.2f}%")
            if h.get("val_loss") is not None:
                parts.append(f"val distill loss {h['val_loss']:.4g}")
            parts.append(f"loss {h['loss']:.4f}" if h.get("loss") is not None else "(calibrated, before training)")
            out.append(f"epoch {h['epoch']}: " + ", ".join(parts))
        if f.get("acc_ort") is not None:
            out.append(f"final val accuracy: fake-quant PyTorch {f['acc_fakequant'] * 100:.2f}%, onnxruntime "
                       f"{f['acc_ort'] * 100:.2f}% (difference {f['diff_pp']:+.2f} pp)")
        for name, o in f.get("outputs", {}).items():
            out.append(f"fidelity {name}: fake-quant vs onnxruntime max diff "
                       + (f"{o['max_steps']:.2f} quantization steps" if o.get("max_steps") is not None
                          else f"{o['max_abs']:.4g}")
                       + (f", argmax agreement {o['argmax_agreement'] * 100:.2f}%" if "argmax_agreement" in o else ""))
        out += [f"note: {n}" for n in self.notes]
        return out


# -- the QAT run -------------------------------------------------------------------------------------

def _outputs(module: nn.Module, fused: onnx.ModelProto, ds: QATData, pre: Preprocess, device: torch.device,
             names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Every output of `module` (eval mode) on every sample of `ds`."""
    module.eval()
    outs: list[tuple] = []
    with torch.no_grad():
        for feeds in eval_feeds(fused, ds, pre, _EVAL_BATCH):
            y = forward(module, {k: torch.from_numpy(v).to(device) for k, v in feeds.items()})
            outs.append((y,) if isinstance(y, torch.Tensor) else tuple(y))
    return {n: np.concatenate([o[i].float().cpu().numpy() for o in outs]) for i, n in enumerate(names)}


def _ort_outputs(model: onnx.ModelProto, fused: onnx.ModelProto, ds: QATData, pre: Preprocess) -> dict[str, np.ndarray]:
    from qtool.evaluation import make_session

    sess = make_session(model)
    names = [o.name for o in sess.get_outputs()]
    runs = [sess.run(None, feeds) for feeds in eval_feeds(fused, ds, pre, _EVAL_BATCH)]
    return {n: np.concatenate([r[i] for r in runs]) for i, n in enumerate(names)}


def _accuracy(outputs: dict[str, np.ndarray], obj: QATObjective, labels: np.ndarray | None) -> float | None:
    scored = obj.ce_output or (obj.class_outputs[0] if obj.class_outputs else None)
    if labels is None or scored is None:
        return None
    return float((outputs[scored].argmax(1) == labels).mean())


def _distill_value(obj: QATObjective, outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """The distillation objective over a whole split (the MSE terms normalized by the split's variance)."""
    t = lambda d: tuple(torch.from_numpy(d[n]) for n in obj.outputs)  # noqa: E731
    return float(distill_objective(list(obj.losses), t(outputs), t(reference)))


def measure_fidelity(fq: dict[str, np.ndarray], ref: dict[str, np.ndarray], plan: QuantPlan,
                     obj: QATObjective, labels: np.ndarray | None) -> dict:
    """Fake-quant (`fq`) vs onnxruntime (`ref`) per output: the max |difference| in quantization steps
    (the step of the output's quantizer in the plan; a float output: one 8-bit step of its range on
    the split, (max - min) / 255) and, for class scores, the argmax agreement. The first class-score
    output (else the first output) also fills the summary keys of earlier versions (logit_*)."""
    per: dict[str, dict] = {}
    for n in obj.outputs:
        diff = float(np.abs(fq[n].astype(np.float64) - ref[n]).max()) if fq[n].size else 0.0
        if n in plan.tensors:
            step, what = float(np.max(plan.tensors[n].scale)), "plan"
        else:
            span = float(ref[n].max() - ref[n].min()) if ref[n].size else 0.0
            step, what = (span / 255 if span > 0 else None), "range/255"
        o = {"max_abs": diff, "step": step, "step_of": what,
             "max_steps": diff / step if step else (0.0 if diff == 0 else float("inf"))}
        if n in obj.class_outputs:
            o["argmax_agreement"] = float((fq[n].argmax(1) == ref[n].argmax(1)).mean())
        per[n] = o
    main = obj.ce_output or (obj.class_outputs[0] if obj.class_outputs else obj.outputs[0])
    acc_fq, acc_ort = _accuracy(fq, obj, labels), _accuracy(ref, obj, labels)
    m = per[main]
    return {"acc_fakequant": acc_fq, "acc_ort": acc_ort,
            "diff_pp": (acc_fq - acc_ort) * 100 if acc_fq is not None else None,
            "argmax_agreement": m.get("argmax_agreement"), "logit_max_abs": m["max_abs"],
            "logit_step": m["step"] if m["step_of"] == "plan" else None,
            "logit_max_steps": m["max_steps"] if m["step_of"] == "plan" else None,
            "n": int(len(next(iter(ref.values())))), "outputs": per}


def fidelity_failure(fidelity: dict) -> str | None:
    """Why the run fails the fidelity gate (GATE_STEPS, GATE_ARGMAX), naming the worst output; None if it passes."""
    per = fidelity["outputs"]
    bad = []
    worst = max(per, key=lambda n: per[n]["max_steps"])
    w = per[worst]
    if w["max_steps"] > GATE_STEPS:
        bad.append(f"output {worst!r} differs by {w['max_steps']:.2f} quantization steps (max |diff| "
                   f"{w['max_abs']:.4g}, step {w['step']:.4g} from the {w['step_of']}; the gate is {GATE_STEPS:g})")
    agree = {n: o["argmax_agreement"] for n, o in per.items() if "argmax_agreement" in o}
    if agree:
        low = min(agree, key=agree.get)
        if agree[low] < GATE_ARGMAX:
            bad.append(f"output {low!r} argmax agreement {agree[low] * 100:.2f}% (the gate is {GATE_ARGMAX * 100:g}%)")
    if not bad:
        return None
    return (f"fidelity gate: fake-quant PyTorch vs onnxruntime on {fidelity['n']} val samples: " + "; ".join(bad)
            + ": the QDQ model does not compute what was trained")


def qat(model: onnx.ModelProto, train_data: QATData, val_data: QATData, config: QATConfig = QATConfig(),
        preprocess: Preprocess | None = None) -> QATResult:
    """Quantization-aware training of an ONNX model; see the module docstring. Raises QtoolError when
    the result fails the fidelity gate (`fidelity_failure`) unless `config.accept_fidelity`."""
    if not isinstance(config, QATConfig):
        raise QtoolError(f"config must be a QATConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    notes: list[str] = []
    pre = preprocess or resolve_preprocess(model)
    if isinstance(train_data, ImageDataset) or isinstance(val_data, ImageDataset):
        name, dims = model_image_input(model)
        check_input_matches(dims, train_data, name)
    history: list[dict] = []
    run: dict = {}  # the model being trained, its teacher's val outputs and when its training started

    def validate(qm) -> dict:
        outs = _outputs(qm.lifted, qm.fused, val_data, pre, qm.device, qm.objective.outputs)
        out = {"val_acc": _accuracy(outs, qm.objective, labels_of(val_data))}
        if qm.objective.loss == "distill":
            out["val_loss"] = _distill_value(qm.objective, outs, run["reference"])
        return out

    def before_training(qm, teacher) -> None:  # epoch 0: calibrated, not trained yet
        if qm.objective.loss == "distill":
            run["reference"] = _outputs(teacher.to(qm.device), qm.fused, val_data, pre, qm.device, qm.objective.outputs)
        history.append({"epoch": 0, **validate(qm), "loss": None})
        run.update(qm=qm, t=time.perf_counter())

    def on_epoch(epoch: int, meter: EpochMeter, bar) -> None:
        v = validate(run["qm"])
        history.append({"epoch": epoch + 1, "loss": meter.loss, "train_acc": meter.acc, **v,
                        "elapsed_s": round(time.perf_counter() - run["t"], 1)})
        if not config.quiet:
            shown = [f"loss {meter.loss:.4f}"] + ([f"train {meter.acc:.4f}"] if meter.acc is not None else []) \
                + ([f"val (fake-quant) {v['val_acc']:.4f}"] if v["val_acc"] is not None else []) \
                + ([f"val distill loss {v['val_loss']:.4g}"] if v.get("val_loss") is not None else [])
            bar.console.print(f"epoch {epoch + 1}: " + " ".join(shown))

    # The same run as the search's --eval qat (qtool.qat_model.run_qat), with validation after each epoch.
    qm = run_qat(model, train_data, config, pre, notes=notes, before_training=before_training, on_epoch=on_epoch)
    lifted, fused, device, obj = qm.lifted, qm.fused, qm.device, qm.objective
    notes[:0] = obj.lines()

    # Export: qparams -> plan; fake-quantized weights -> the fused graph -> QDQ.
    tuned, plan = qm.to_plan({"producer": "qtool.qat", "algo": config.algo, "epochs": config.epochs,
                              "loss": obj.loss, "bn_fold": bool(qm.pairs), **config.meta})
    qmodel = apply_plan(tuned, plan)
    exact = qm.install_exact_eval()
    notes.append(f"eval mode emulates onnxruntime's integer kernels at {len(exact)} quantized ops (qtool.ortexact)")

    # Fidelity on the val split: the fake-quant model vs onnxruntime on the written model, and its gate.
    fq = _outputs(lifted, fused, val_data, pre, torch.device("cpu"), obj.outputs)
    fidelity = measure_fidelity(fq, _ort_outputs(qmodel, fused, val_data, pre), plan, obj, labels_of(val_data))
    failure = fidelity_failure(fidelity)
    fidelity["gate"] = "failed, accepted" if failure else "passed"
    if failure:  # where the codes part, which the outputs' difference does not tell
        feeds = next(eval_feeds(fused, val_data, pre, _TRACE_BATCH))
        where = first_divergence(code_divergence(qmodel, lifted, plan, feeds, qm.names))
        if where:
            fidelity["first_divergence"] = where
            failure += f"; {where}"
        if not config.accept_fidelity:
            raise QtoolError(failure + "; accept_fidelity (--accept-fidelity) writes it anyway")
        log.warning("%s (accepted: accept_fidelity)", failure)
        notes.append("WARNING " + failure + " (written: accept_fidelity)")
    plan.meta["fidelity"] = {k: v for k, v in fidelity.items()}
    return QATResult(qmodel, plan, tuned, history, fidelity, lifted, list(dict.fromkeys(notes)), bool(qm.pairs),
                     str(device), time.perf_counter() - t0, obj.loss)
