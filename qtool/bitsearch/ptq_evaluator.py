"""`PTQEvaluator` ("ptq"): each candidate as plain post-training quantization, scored on onnxruntime.

One calibration (`qtool.ptq.calibration_stats`, `qtool quantize`'s, with its QuantConfig), then per
bit-width the plan `build_plan` gives (weights at w bits with the config's 8-bit activations, for the
kernel pair bound; activations at a bits). A candidate's plan takes each tensor the search space
quantizes from the plan of its bits and leaves the float ones out, which is what `--max-drop` builds for
a choice of units. Its QDQ model (`exporters.qdq.apply_plan`) is scored on the validation images on
onnxruntime: no training, and the searched accuracy is the deployed one (the front's re-check on
onnxruntime gives the same number). Seconds per candidate; the accuracy a PTQ of those bits can reach,
not what a fine-tune would (evaluators "supernet" / "qat").
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx

from qtool.bitsearch.evaluators import Evaluator, SearchData
from qtool.bitsearch.space import FLOAT, Candidate, SearchSpace
from qtool.plan import QuantPlan
from qtool.ptq import QuantConfig, build_plan, calibration_stats

CALIB_BATCH = 64


class PTQEvaluator(Evaluator):
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
        from qtool.data import model_image_input

        name, _ = model_image_input(fused)
        calib = [{name: data.pre.apply(data.calib_images[i:i + CALIB_BATCH])}
                 for i in range(0, len(data.calib_images), CALIB_BATCH)]
        stats, exclude = calibration_stats(fused, calib, self.config, all_activations=True)
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
        from qtool.evaluation import make_session

        plan = self.plan(c)
        sess = make_session(apply_plan(self.fused, plan) if plan.tensors else self.fused, threads=self.threads)
        name, val = sess.get_inputs()[0].name, self.data.val
        return np.concatenate([sess.run(None, {name: self.data.pre.apply(val.images[i:i + 256])})[0].argmax(1)
                               == val.labels[i:i + 256] for i in range(0, len(val), 256)])

    def materialize(self, c: Candidate) -> tuple[onnx.ModelProto, QuantPlan, float]:
        return self.fused, self.plan(c), self.evaluate(c)
