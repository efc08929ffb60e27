"""`SearchConfig`: every setting of one `qtool search` run, validated before any work starts."""
from __future__ import annotations

from dataclasses import dataclass

from qtool.bitsearch.objectives import make_objectives
from qtool.bitsearch.space import TARGETS, target_options
from qtool.errors import QtoolError

EVALUATORS = ("supernet", "qat", "ptq")
EXECUTORS = ("local", "ray")
DEFAULT_BITS = (2, 4, 8)
# What each target rewards: on CPU only float vs int8 changes the measured latency (bitsearch.objectives),
# so FLOPs / BitOps would favour w4a8 layers that run no faster there.
DEFAULT_OBJECTIVES = {"cpu": ("acc", "latency"), "grid": ("acc", "flops")}


@dataclass(frozen=True)
class SearchConfig:
    # of acc, flops, bitops, size, packed_size, latency; None: the target's (DEFAULT_OBJECTIVES)
    objectives: tuple[str, ...] | None = None
    # cpu: per layer float / int8 / w4a8 (control_config.TARGET_CHOICES: what onnxruntime's CPU kernels
    # reward); grid: weight and activation bits over `bits`, for hardware with sub-8-bit kernels.
    target: str = "cpu"
    bits: tuple[int, ...] | None = None  # target grid: candidate bit-widths of every searched tensor [2, 4, 8]
    pop: int = 16
    gens: int = 10
    seed: int = 0
    # Start NSGA-III from the uniform members (cpu: float, int8, w4a8; grid: W8A8, W4A8, ..., W2A2;
    # False: random genes only).
    seed_uniform: bool = True
    # supernet (one shared multi-bit net) | qat (a fine-tune per candidate) | ptq (plain PTQ on onnxruntime)
    evaluator: str = "supernet"
    executor: str = "local"  # local | ray
    workers: int = 1  # parallel evaluations (local: 1 = in-process)
    resume: bool = False  # continue the search in the workdir, reusing every logged evaluation
    train_limit: int | None = None
    val_limit: int | None = None
    supernet_epochs: float = 1.0
    qat_steps: int = 100  # fine-tune steps per candidate (evaluator qat)
    qat_distill: float = 0.0  # weight of the FP32 model's soft labels in each fine-tune (evaluator qat)
    qat_loss: str = "auto"  # each fine-tune's QATConfig.loss: auto | ce | distill (evaluator qat)
    batch_size: int = 64
    lr: float = 0.002  # from a trained model: 0.01 cost W8A8 2 points in 60 steps
    fixed_bits: int = 8  # bits of the first and last layer (0: search them too; target cpu: 8 = int8 or 0)
    max_size: float | None = None  # constraint: QDQ file bytes
    max_latency: float | None = None  # constraint: onnxruntime batch-1 latency in ms
    device: str = "cpu"
    sandwich_low: int | None = None  # target grid: bits of the supernet sandwich's small end [the smallest of bits]

    def __post_init__(self):
        for k in ("objectives", "bits"):
            if not isinstance(getattr(self, k), tuple) and getattr(self, k) is not None:
                raise QtoolError(f"{k} must be a tuple, got {getattr(self, k)!r}")
        if self.target not in TARGETS:
            raise QtoolError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.objectives is None:
            object.__setattr__(self, "objectives", DEFAULT_OBJECTIVES[self.target])
        make_objectives(list(self.objectives))  # names, repeats, at least two: its checks, before any work
        if self.bits is not None and (not self.bits or not all(isinstance(b, int) and 2 <= b <= 8 for b in self.bits)):
            raise QtoolError(f"bits must be integers in 2..8, got {self.bits}")
        if self.target != "grid":
            options = [n for n, _ in target_options(self.target)]
            names = ", ".join(options)
            if self.bits is not None:
                raise QtoolError(f"bits ({','.join(map(str, self.bits))}) apply to target grid; target "
                                 f"{self.target!r} chooses among {names} per layer")
            if self.fixed_bits not in (0, 8):
                raise QtoolError(f"fixed_bits must be 8 (int8) or 0 (search first/last layers too) on target "
                                 f"{self.target!r}, got {self.fixed_bits}")
            if self.sandwich_low is not None:
                raise QtoolError(f"sandwich_low applies to target grid; on target {self.target!r} the supernet "
                                 f"sandwich's small end is uniform {options[-1]}")
        if self.evaluator not in EVALUATORS:
            raise QtoolError(f"unknown evaluator {self.evaluator!r}; choose {' or '.join(EVALUATORS)}")
        if self.executor not in EXECUTORS:
            raise QtoolError(f"unknown executor {self.executor!r}; choose {' or '.join(EXECUTORS)}")
        if not isinstance(self.fixed_bits, int) or not (self.fixed_bits == 0 or 2 <= self.fixed_bits <= 8):
            raise QtoolError(f"fixed_bits must be 0 (search first/last layers too) or 2..8, got {self.fixed_bits}")
        if self.sandwich_low is not None and (self.evaluator != "supernet" or self.sandwich_low not in self.grid_bits):
            raise QtoolError(f"sandwich_low must be one of bits {list(self.grid_bits)} with the supernet evaluator, "
                             f"got {self.sandwich_low}")
        if self.qat_distill and self.evaluator != "qat":
            raise QtoolError(f"qat_distill needs the qat evaluator, got {self.evaluator}")
        from qtool.qat_config import LOSSES

        if self.qat_loss not in LOSSES:
            raise QtoolError(f"qat_loss must be one of {', '.join(LOSSES)}, got {self.qat_loss!r}")
        if self.qat_loss != "auto" and self.evaluator != "qat":
            raise QtoolError(f"qat_loss needs the qat evaluator, got {self.evaluator}")
        for k in ("workers", "qat_steps", "batch_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise QtoolError(f"{k} must be an integer >= 1, got {v!r}")

    @property
    def grid_bits(self) -> tuple[int, ...]:
        """The bit-widths of target grid (`bits`, default 2, 4, 8)."""
        return DEFAULT_BITS if self.bits is None else self.bits
