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
`qat` adds the per-epoch validation and the onnxruntime fidelity check; `qat_finetune` is the same
run without them, which the search's `--eval qat` evaluator calls per candidate.

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
from qtool.data import ImageDataset, check_input_matches, model_image_input
from qtool.errors import QtoolError
from qtool.plan import QuantPlan
from qtool.preprocess import Preprocess, resolve_preprocess
from qtool.qat_bits import TensorSpec, resolve_bits  # part of this module's API (tests, callers of qtool qat)
from qtool.qat_config import QATConfig
from qtool.qat_model import run_qat
from qtool.trainloop import EpochMeter

log = logging.getLogger(__name__)

__all__ = ["qat", "QATConfig", "QATResult", "TensorSpec", "resolve_bits"]

_EVAL_BATCH = 256


@dataclass
class QATResult:
    model: onnx.ModelProto  # QDQ model
    plan: QuantPlan
    fused: onnx.ModelProto  # fused float graph with the tuned, fake-quantized weights
    history: list[dict]  # per epoch (epoch 0 = after calibration, before training)
    fidelity: dict  # fake-quant vs onnxruntime on the val split
    module: nn.Module | None = None  # the trained fake-quant PyTorch model (eval mode, CPU)
    notes: list[str] = field(default_factory=list)  # fallbacks and choices a user should know about
    bn_fold: bool = False  # Conv->BN pairs trained unfolded (QATConfig.bn "unfold" and a graph it applies to)
    device: str = "cpu"
    wall_time_s: float = 0.0

    def save(self, path: str | Path, plan_path: str | Path | None = None) -> None:
        from qtool.io import save_model

        save_model(self.model, path)
        if plan_path is not None:
            self.plan.save(plan_path)

    def lines(self) -> list[str]:
        f = self.fidelity
        out = [f"epoch {h['epoch']}: val acc (fake-quant) {h['val_acc'] * 100:.2f}%"
               + (f", loss {h['loss']:.4f}" if h.get("loss") is not None else " (calibrated, before training)")
               for h in self.history]
        out.append(f"final val accuracy: fake-quant PyTorch {f['acc_fakequant'] * 100:.2f}%, onnxruntime "
                   f"{f['acc_ort'] * 100:.2f}% (difference {f['diff_pp']:+.2f} pp, argmax agreement "
                   f"{f['argmax_agreement'] * 100:.2f}%, logits max diff "
                   + (f"{f['logit_max_steps']:.2f} quantization steps)" if f.get("logit_max_steps") is not None
                      else f"{f['logit_max_abs']:.4g})"))
        out += [f"note: {n}" for n in self.notes]
        return out


# -- the QAT run -------------------------------------------------------------------------------------

def _evaluate(module: nn.Module, ds: ImageDataset, pre: Preprocess, device: torch.device) -> tuple[float, np.ndarray]:
    module.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(ds), _EVAL_BATCH):
            x = torch.from_numpy(pre.apply(ds.images[i:i + _EVAL_BATCH])).to(device)
            outs.append(module(x).float().cpu().numpy())
    logits = np.concatenate(outs)
    return float((logits.argmax(1) == ds.labels).mean()), logits


def _ort_logits(model: onnx.ModelProto, ds: ImageDataset, pre: Preprocess) -> np.ndarray:
    from qtool.evaluation import make_session

    sess = make_session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: pre.apply(ds.images[i:i + _EVAL_BATCH])})[0]
                           for i in range(0, len(ds), _EVAL_BATCH)])




def qat(model: onnx.ModelProto, train_data: ImageDataset, val_data: ImageDataset, config: QATConfig = QATConfig(),
        preprocess: Preprocess | None = None) -> QATResult:
    """Quantization-aware training of an ONNX model; see the module docstring."""
    if not isinstance(config, QATConfig):
        raise QtoolError(f"config must be a QATConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    notes: list[str] = []
    pre = preprocess or resolve_preprocess(model)
    name, dims = model_image_input(model)
    check_input_matches(dims, train_data, name)
    history: list[dict] = []
    run: dict = {}  # the model being trained and when its training started

    def before_training(qm) -> None:  # epoch 0: calibrated, not trained yet
        history.append({"epoch": 0, "val_acc": _evaluate(qm.lifted, val_data, pre, qm.device)[0], "loss": None})
        run.update(qm=qm, t=time.perf_counter())

    def on_epoch(epoch: int, meter: EpochMeter, bar) -> None:
        val_acc = _evaluate(run["qm"].lifted, val_data, pre, run["qm"].device)[0]
        history.append({"epoch": epoch + 1, "loss": meter.loss, "train_acc": meter.acc,
                        "val_acc": val_acc, "elapsed_s": round(time.perf_counter() - run["t"], 1)})
        if not config.quiet:
            bar.console.print(f"epoch {epoch + 1}: loss {meter.loss:.4f} train {meter.acc:.4f} "
                              f"val (fake-quant) {val_acc:.4f}")

    # The same run as the search's --eval qat (qtool.qat_model.run_qat), with validation after each epoch.
    qm = run_qat(model, train_data, config, pre, notes=notes, before_training=before_training, on_epoch=on_epoch)
    lifted, fused, device = qm.lifted, qm.fused, qm.device

    # Export: qparams -> plan; fake-quantized weights -> the fused graph -> QDQ.
    tuned, plan = qm.to_plan({"producer": "qtool.qat", "algo": config.algo, "epochs": config.epochs,
                              "bn_fold": bool(qm.pairs), **config.meta})
    qmodel = apply_plan(tuned, plan)
    exact = qm.install_exact_eval()
    notes.append(f"eval mode emulates onnxruntime's integer kernels at {len(exact)} quantized ops (qtool.ortexact)")

    # Fidelity on the val split: the fake-quant model vs onnxruntime on the written model.
    acc_fq, logits_fq = _evaluate(lifted, val_data, pre, torch.device("cpu"))
    logits_ort = _ort_logits(qmodel, val_data, pre)
    acc_ort = float((logits_ort.argmax(1) == val_data.labels).mean())
    diff = float(np.abs(logits_fq - logits_ort).max())
    out_name = fused.graph.output[0].name
    step = plan.tensors[out_name].scale if out_name in plan.tensors else None
    fidelity = {"acc_fakequant": acc_fq, "acc_ort": acc_ort, "diff_pp": (acc_fq - acc_ort) * 100,
                "argmax_agreement": float((logits_fq.argmax(1) == logits_ort.argmax(1)).mean()),
                "logit_max_abs": diff, "logit_step": step,
                "logit_max_steps": diff / step if step else None, "n": len(val_data)}
    plan.meta["fidelity"] = {k: v for k, v in fidelity.items()}
    return QATResult(qmodel, plan, tuned, history, fidelity, lifted, list(dict.fromkeys(notes)), bool(qm.pairs),
                     str(device), time.perf_counter() - t0)
