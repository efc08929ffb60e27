"""QAT configuration: `QATConfig` (frozen, validated) and NNI-style per-op rules from YAML.

Bits come from one of three sources, exactly one per run:

- uniform `weight_bits` / `act_bits` (`--bits w4a4`), with the first/last layer policy
  (`first_last_bits`, default 8: the first and last Conv/Gemm/MatMul keep 8-bit weights and inputs,
  and the last one's output);
- `plan_bits`: per-tensor bits read from a QuantPlan JSON (`--plan`); tensors of the QDQ placement
  the plan leaves out stay float, and no first/last policy applies (the plan is explicit). With
  `plan_init` (also from `--plan`, when the plan has scales: a `qtool quantize --plan-out` plan) the
  quantizers start at the plan's scales and zero points, so QAT starts where PTQ ended (its mse /
  entropy ranges) rather than at minmax calibration;
- `rules`: a YAML config in the style of NNI's `config_list` (`--config`), applied on top of the
  uniform bits and the first/last policy, later entries overriding earlier ones:

    - op_types: [Conv]                 # ONNX op types; Conv2d/Linear and `default` are accepted too
      quant_types: [weight, input]     # which of the op's tensors: weight | input | output
      quant_bits: 4                    # or {weight: 4, input: 8}
    - op_names: [layers.0.conv1, /fc/Gemm]   # node name, or its weight name without ".weight"
      quant_types: [weight, input, output]
      quant_bits: 8
      quant_start_step: 200            # fake-quant off for the first 200 training steps (NNI)
    - op_names: [fc]
      exclude: true                    # leave these tensors float

  A tensor that shares its QDQ parameters with another (pass-through ops: MaxPool, Flatten, ...)
  takes a rule's bits together with that other tensor, since onnxruntime needs them equal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qtool.errors import QtoolError

ALGOS = ("minmax", "ema", "lsq", "pact", "dorefa", "bnn")
OPTIMIZERS = ("sgd", "adam")
LOSSES = ("auto", "ce", "distill")  # auto: ce with labels and one class-score output, else distill
QUANT_TYPES = ("weight", "input", "output")
RULE_KEYS = ("op_types", "op_names", "quant_types", "quant_bits", "quant_start_step", "exclude")
# NNI / PyTorch module names for the ONNX ops they export to.
OP_TYPE_ALIASES = {"Conv1d": ("Conv",), "Conv2d": ("Conv",), "Conv3d": ("Conv",),
                   "ConvTranspose2d": ("ConvTranspose",), "Linear": ("Gemm", "MatMul"),
                   "default": ("Conv", "ConvTranspose", "Gemm", "MatMul")}
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-4}  # fine-tuning rates: QAT starts from a trained model


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_bits(v: Any, what: str) -> None:
    if not _is_int(v) or not 2 <= v <= 8:
        raise QtoolError(f"{what} must be an integer in 2..8, got {v!r}")


def check_weight(weight, name: str) -> float:
    """The distillation weight as a float in [0, 1], or a QtoolError naming `name`."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
        raise QtoolError(f"{name} must be a number in [0, 1], got {weight!r}")
    return float(weight)


@dataclass(frozen=True)
class QuantRule:
    """One `config_list` entry. Empty op_types and op_names match nothing (as in NNI)."""
    op_types: tuple[str, ...] = ()
    op_names: tuple[str, ...] = ()
    quant_types: tuple[str, ...] = QUANT_TYPES
    quant_bits: tuple[tuple[str, int], ...] = ()  # (quant type, bits); a type left out keeps its bits
    quant_start_step: int | None = None
    exclude: bool = False

    def __post_init__(self):
        where = "config rule"
        if not self.op_types and not self.op_names:
            raise QtoolError(f"{where}: needs op_types or op_names")
        for t in self.quant_types:
            if t not in QUANT_TYPES:
                raise QtoolError(f"{where}: quant_types entries must be weight, input or output, got {t!r}")
        for t, b in self.quant_bits:
            if t not in QUANT_TYPES:
                raise QtoolError(f"{where}: quant_bits key must be weight, input or output, got {t!r}")
            _check_bits(b, f"{where}: quant_bits[{t}]")
        if self.quant_start_step is not None and (not _is_int(self.quant_start_step) or self.quant_start_step < 0):
            raise QtoolError(f"{where}: quant_start_step must be an integer >= 0, got {self.quant_start_step!r}")
        if not isinstance(self.exclude, bool):
            raise QtoolError(f"{where}: exclude must be true or false, got {self.exclude!r}")

    def bits_for(self, quant_type: str) -> int | None:
        return dict(self.quant_bits).get(quant_type)

    @classmethod
    def from_dict(cls, d: Any, index: int) -> QuantRule:
        where = f"config rule {index}"
        if not isinstance(d, dict):
            raise QtoolError(f"{where}: expected a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(RULE_KEYS), key=str)
        if unknown:
            raise QtoolError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(RULE_KEYS)})")

        def names(key: str) -> tuple[str, ...]:
            v = d.get(key, [])
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
                raise QtoolError(f"{where}: {key} must be a list of names")
            return tuple(v)

        qtypes = names("quant_types") if "quant_types" in d else QUANT_TYPES
        bits = d.get("quant_bits")
        if bits is None:
            qbits: tuple[tuple[str, int], ...] = ()
        elif isinstance(bits, dict):
            qbits = tuple((str(k), v) for k, v in bits.items())
        else:
            _check_bits(bits, f"{where}: quant_bits")
            qbits = tuple((t, bits) for t in qtypes)
        try:
            return cls(names("op_types"), names("op_names"), qtypes, qbits, d.get("quant_start_step"),
                       d.get("exclude", False))
        except QtoolError as e:
            raise QtoolError(f"{where}: {str(e).split(': ', 1)[-1]}") from None


def parse_config_list(data: Any) -> tuple[QuantRule, ...]:
    """A config_list (YAML list), or a mapping holding one under `config_list`."""
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"config_list"}, key=str)
        if unknown:
            raise QtoolError(f"QAT config: unknown top-level key {unknown[0]!r} (expected config_list)")
        data = data.get("config_list")
    if not isinstance(data, list) or not data:
        raise QtoolError("QAT config must be a non-empty list of rules (NNI config_list style)")
    return tuple(QuantRule.from_dict(d, i) for i, d in enumerate(data))


def load_config_list(path: str | Path) -> tuple[QuantRule, ...]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise QtoolError(f"QAT config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise QtoolError(f"cannot read QAT config {p}: {e}") from None
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QtoolError(f"QAT config {p} is not valid YAML: {first}") from None
    return parse_config_list(data)


def load_plan_init(path: str | Path) -> tuple[tuple[str, tuple[float, ...], tuple[int, ...]], ...]:
    """(tensor, scales, zero points) of every tensor of a QuantPlan JSON that has them."""
    from qtool.plan import QuantPlan

    return plan_init_of(QuantPlan.load(path))


def plan_init_of(plan) -> tuple[tuple[str, tuple[float, ...], tuple[int, ...]], ...]:
    """QATConfig.plan_init of a QuantPlan: (tensor, scales, zero points) of every tensor that has them."""
    out = []
    for name, tq in plan.tensors.items():
        if tq.scale is None:
            continue
        scales = tuple(float(v) for v in np.asarray(tq.scale, np.float64).reshape(-1))
        zps = tuple(int(v) for v in np.asarray(tq.zero_point).reshape(-1))
        out.append((name, scales, zps))
    return tuple(out)


def load_plan_bits(path: str | Path) -> tuple[tuple[str, int], ...]:
    """Per-tensor bits of a QuantPlan JSON (its scales, if any, are recomputed by calibration + QAT)."""
    from qtool.plan import QuantPlan

    plan = QuantPlan.load(path)
    if not plan.tensors:
        raise QtoolError(f"plan {path} has no tensors")
    return plan_bits_of(plan)


def plan_bits_of(plan) -> tuple[tuple[str, int], ...]:
    """QATConfig.plan_bits of a QuantPlan."""
    return tuple((name, tq.bits) for name, tq in plan.tensors.items())


@dataclass(frozen=True)
class QATConfig:
    weight_bits: int = 8
    act_bits: int = 8
    first_last_bits: int | None = 8  # None: the first/last layers get the uniform bits too
    plan_bits: tuple[tuple[str, int], ...] = ()  # per-tensor bits (from a plan); replaces the uniform bits
    plan_init: tuple[tuple[str, tuple[float, ...], tuple[int, ...]], ...] = ()  # starting (scales, zero points)
    rules: tuple[QuantRule, ...] = ()  # NNI-style rules over the uniform bits
    algo: str = "lsq"
    quant_delay: int = 0  # training steps before fake-quant turns on (observers still watch)
    ema_decay: float = 0.99
    bn: str = "unfold"  # BN strategy (qtool.bn_strategy): unfold = Conv->BN of an unfused model trained with
    # BN kept (fake-quant on the folded weight); fold = train the fused graph
    freeze_bn: int | None = None  # step at which BN statistics freeze; None: half of the steps
    epochs: int = 1
    steps: int | None = None  # train exactly this many optimizer steps instead of `epochs` (0: no training)
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment: bool = True  # CIFAR-style crop + flip, for 3-channel images of 16 px or more
    train_limit: int | None = None  # train on the first N images of the (fixed) shuffled train split
    calib_size: int = 512
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    distill: float = 0.0  # weight in [0, 1] of the FP32 model's soft labels in the ce loss (qtool.distill)
    loss: str = "auto"  # ce: labels (one class-score output); distill: every output vs the FP32 model's
    # (KL for class scores, MSE otherwise: qtool.distill); auto: ce with labels and one class-score output
    loss_weights: tuple[tuple[str, float], ...] = ()  # (output name, weight) of distill's per-output losses
    accept_fidelity: bool = False  # write the model even when fake-quant and onnxruntime disagree (the gate)
    quiet: bool = False
    meta: dict = field(default_factory=dict, compare=False, hash=False)  # free-form provenance for the plan

    def __post_init__(self):
        _check_bits(self.weight_bits, "weight_bits")
        _check_bits(self.act_bits, "act_bits")
        if self.first_last_bits is not None:
            _check_bits(self.first_last_bits, "first_last_bits")
        if self.plan_bits and self.rules:
            raise QtoolError("give per-tensor bits either as a plan or as a config, not both")
        for name, b in self.plan_bits:
            _check_bits(b, f"plan bits of {name!r}")
        if not all(isinstance(r, QuantRule) for r in self.rules):
            raise QtoolError("rules must be QuantRule objects (see load_config_list)")
        if self.algo not in ALGOS:
            raise QtoolError(f"algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        if self.optimizer not in OPTIMIZERS:
            raise QtoolError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        for k in ("quant_delay", "epochs", "batch_size", "calib_size", "seed"):
            v = getattr(self, k)
            lo = 0 if k in ("quant_delay", "seed") else 1
            if not _is_int(v) or v < lo:
                raise QtoolError(f"{k} must be an integer >= {lo}, got {v!r}")
        if self.steps is not None and (not _is_int(self.steps) or self.steps < 0):
            raise QtoolError(f"steps must be an integer >= 0 or None, got {self.steps!r}")
        check_weight(self.distill, "distill")
        if self.loss not in LOSSES:
            raise QtoolError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not isinstance(self.loss_weights, tuple) or not all(
                isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) and e[0] for e in self.loss_weights):
            raise QtoolError(f"loss_weights must be ((output name, weight), ...), got {self.loss_weights!r}")
        for name, w in self.loss_weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf"):
                raise QtoolError(f"loss_weights of {name!r} must be a number >= 0, got {w!r}")
        if len({n for n, _ in self.loss_weights}) < len(self.loss_weights):
            raise QtoolError("loss_weights name an output twice")
        if self.loss_weights and self.loss == "ce":
            raise QtoolError("loss_weights weigh distill's per-output losses; loss ce has one output's loss")
        for k in ("freeze_bn", "train_limit"):
            v = getattr(self, k)
            if v is not None and (not _is_int(v) or v < (0 if k == "freeze_bn" else 1)):
                raise QtoolError(f"{k} must be a positive integer or None, got {v!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not 0 < self.lr < 10):
            raise QtoolError(f"lr must be a number in (0, 10), got {self.lr!r}")
        for k in ("momentum", "ema_decay"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise QtoolError(f"{k} must be in [0, 1), got {v!r}")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) \
                or not 0 <= self.weight_decay < 1:
            raise QtoolError(f"weight_decay must be in [0, 1), got {self.weight_decay!r}")
        from qtool.bn_modes import check_bn

        check_bn(self.bn, "qat")
        for k in ("augment", "quiet", "accept_fidelity"):
            if not isinstance(getattr(self, k), bool):
                raise QtoolError(f"{k} must be true or false, got {getattr(self, k)!r}")
        if self.device is not None:
            from qtool.device import check_device

            check_device(self.device)

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.optimizer]
