"""One borrowed-GPU session's benchmark batch, run as ONE command against a wall-clock deadline.

    python -m benchmarks.gpu_batch --out DIR [--deadline 540] [--search-workdir W]

A borrowed GPU machine gives a session minutes, not hours, and starts bare, so everything runs in one
call: jobs in parallel processes (the GPU is mostly idle between the small kernels of ResNet-20 /
CIFAR-10, and the machine has 16 cores), each with its own log, stopped at the deadline, then packed
as one .tar.gz per job (results JSON + run directory) into DIR, the folder that comes back.

1. `probe`: `benchmarks.dynamic --quick` on the GPU. It is the smoke test of every CUDA path of the
   dynamic trainer, and its measured seconds per training step size the real dynamic runs' epochs to
   the time left (recorded in batch.json: nothing is tuned by hand to the answer).
2. `search`: `benchmarks.search --stage finetune` from a search stage run on the CPU (the issue's
   60-minute budget is a 2-core CPU budget): the uniform baselines and the picked front members, each
   fine-tuned with the same budget on the GPU.
3. `dynamic_gpu_*`: `benchmarks.dynamic` variants (budget, controller, bit set) on the whole training split.

Sizing by hand (`--dynamic-epochs`, no probe): one 45k-image epoch of 2-3 parallel dynamic jobs trains in
about 100-280 s, and each job then needs about 200 s more (codebook over the training images,
evaluation, deployment, onnxruntime, the static baseline). gpu_batch_4.json gave a 285 s deadline: both
jobs were stopped after writing their deployment (`benchmarks.dynamic_static` finishes such runs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, cifar_spec

PY = sys.executable
SLOWDOWN = 2.5  # assumed: each of the ~8 processes sharing the GPU runs this much slower than alone
# name -> benchmarks.dynamic arguments
DYNAMIC_VARIANTS = {
    "dynamic_gpu_batch": ["--bits", "3,4,5", "--target", "u4", "--budget", "batch"],
    "dynamic_gpu_sample": ["--bits", "3,4,5", "--target", "u4", "--budget", "sample"],
    "dynamic_gpu_conv": ["--bits", "3,4,5", "--target", "u4", "--budget", "sample", "--controller-conv", "32"],
    "dynamic_gpu_conv_u3": ["--bits", "2,3,4", "--target", "u3", "--budget", "sample", "--controller-conv", "32"],
    # ORT-vs-PyTorch fidelity of a GPU-trained model, evaluated with TF32 off (qtool.device)
    "dynamic_gpu_fidelity": ["--bits", "3,4,5", "--target", "u4", "--budget", "sample"],
    # the batch-budget run again (now with the gap diagnostics), and with the FP32 model's soft labels
    # (dynamic and static alike) at two weights
    "dynamic_gpu_kd0": ["--bits", "3,4,5", "--target", "u4", "--budget", "batch"],
    "dynamic_gpu_kd05": ["--bits", "3,4,5", "--target", "u4", "--budget", "batch", "--distill", "0.5"],
    "dynamic_gpu_kd1": ["--bits", "3,4,5", "--target", "u4", "--budget", "batch", "--distill", "1.0"],
    # the controller reads the end of ResNet-20's first stage (layers 1-6 static at 4 bits): deeper features
    "dynamic_gpu_ctl7": ["--bits", "3,4,5", "--target", "u4", "--budget", "batch", "--controller-layers", "7"],
    "dynamic_gpu_ctl7_kd05": ["--bits", "3,4,5", "--target", "u4", "--budget", "batch", "--controller-layers", "7",
                              "--distill", "0.5"],
}


class Job:
    def __init__(self, name: str, argv: list[str], logdir: Path, files: list[Path]):
        self.name, self.argv, self.files = name, argv, files
        self.log = logdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.t0 = self.t1 = 0.0
        self.rc: int | None = None

    def start(self) -> "Job":
        self.t0 = time.time()
        self.proc = subprocess.Popen(self.argv, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self

    def poll(self) -> bool:
        if self.rc is None and self.proc is not None and self.proc.poll() is not None:
            self.rc, self.t1 = self.proc.returncode, time.time()
        return self.rc is not None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self.rc, self.t1 = -9, time.time()

    def summary(self) -> dict:
        return {"argv": self.argv[2:], "rc": self.rc, "seconds": round((self.t1 or time.time()) - self.t0, 1)}


def wait(jobs: list[Job], until: float) -> None:
    """Until every job ended; those still running at `until` are killed."""
    while time.time() < until and not all(j.poll() for j in jobs):
        time.sleep(2)
    for j in jobs:
        if not j.poll():
            j.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the packed results (the one that comes back)")
    ap.add_argument("--deadline", type=float, default=540, help="seconds from start until every job is stopped")
    ap.add_argument("--search-workdir", default=None, help="workdir holding search_stage.json (skip search if absent)")
    ap.add_argument("--finetune-steps", type=int, default=None,
                    help="per fine-tuned candidate [sized by the probe: 1-5 epochs of 352 steps]")
    ap.add_argument("--max-epochs", type=int, default=8, help="cap of the dynamic runs' epochs")
    ap.add_argument("--dynamic-epochs", type=int, default=None,
                    help="epochs of the dynamic runs, skipping the probe (its sizing is known from earlier batches)")
    ap.add_argument("--variants", default="dynamic_gpu_batch,dynamic_gpu_sample,dynamic_gpu_conv,dynamic_gpu_conv_u3")
    ap.add_argument("--ft-workers", type=int, default=4, help="processes fine-tuning search candidates")
    ap.add_argument("--search-name", default="search", help="result name of the search fine-tunes (results/NAME.json)")
    ap.add_argument("--search-args", default="", help="more benchmarks.search arguments, e.g. '--finetune-seeds 2'")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the plumbing on this machine")
    ap.add_argument("--train-limit", type=int, default=45000, help="training images of the dynamic runs")
    ap.add_argument("--probe-images", type=int, default=2000, help="training images of the probe (1 epoch)")
    a = ap.parse_args(argv)
    t_start = time.time()
    end = t_start + a.deadline
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="gpu-batch-logs-"))  # packed into each job's tar: few files come back
    import torch

    batch = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA",
             "torch": torch.__version__, "cpu_count": os.cpu_count(), "deadline_s": a.deadline, "jobs": {}}
    print(json.dumps({k: batch[k] for k in ("device", "torch", "cpu_count")}), flush=True)
    from qtool.data import load_dataset

    spec = cifar_spec()
    for split in ("train", "val"):  # decode once into the cache before the parallel jobs read it
        load_dataset(spec, split)
    ft_epochs, epochs = 2, 0  # without a probe: a guess for the fine-tunes, no dynamic runs
    if a.dynamic_epochs:
        batch["sizing"] = {"dynamic_epochs": a.dynamic_epochs, "note": "given (--dynamic-epochs): no probe"}
        return _run_jobs(a, batch, logs, out, end, t_start, a.dynamic_epochs, ft_epochs, [])
    probe = Job("probe", [PY, "-m", "benchmarks.dynamic", "--quick", "--device", a.device, "--no-latency",
                          "--name", "dynamic_gpu_probe", "--threads", "2", "--train-limit", str(a.probe_images)], logs,
                [RESULTS / "dynamic_gpu_probe.json"]).start()
    wait([probe], min(end, time.time() + 240))
    batch["jobs"]["probe"] = probe.summary()
    if probe.rc == 0:
        cost = json.loads((RESULTS / "dynamic_gpu_probe.json").read_text())["training_cost"]
        steps_probe = math.ceil(a.probe_images / 128)
        t_dyn = cost["dynamic_s_per_epoch"] / steps_probe
        t_static = (cost["static_s_per_epoch"] or 0.0) / steps_probe
        # Left for training: the time to the deadline, less ~120 s for data, calibration, codebook and ORT
        # evaluation, shared by the parallel runs (assumed SLOWDOWN x slower each than alone).
        budget = max(0.0, end - time.time() - 120) / SLOWDOWN
        steps_per_epoch = math.ceil(min(a.train_limit, 45000) / 128)
        epochs = max(1, min(a.max_epochs, int(budget / (steps_per_epoch * (t_dyn + t_static)))))
        # Fine-tunes: 2 baselines + up to 2 x 3 members on 4 workers = 2 rounds; the probe's static step (all K
        # branches of the dynamic net) costs more than a search candidate's: an upper bound.
        ft_epochs = max(1, min(5, int(budget / (2 * 352 * t_static)))) if t_static else 1
        batch["sizing"] = {"probe_s_per_step_dynamic": t_dyn, "probe_s_per_step_static": t_static,
                           "training_budget_s_per_run": budget, "slowdown_assumed": SLOWDOWN,
                           "dynamic_epochs": epochs, "finetune_epochs": ft_epochs}
        print(f"probe: {t_dyn * 1000:.0f} / {t_static * 1000:.0f} ms per dynamic / static step -> dynamic "
              f"{epochs} epochs, fine-tunes {ft_epochs} epochs", flush=True)
    return _run_jobs(a, batch, logs, out, end, t_start, epochs, ft_epochs, [probe])


def _run_jobs(a, batch: dict, logs: Path, out: Path, end: float, t_start: float, epochs: int, ft_epochs: int,
              done: list[Job]) -> int:
    """Start the search fine-tunes and the dynamic variants, wait until the deadline, pack every job."""
    jobs: list[Job] = []
    if a.search_workdir and (Path(a.search_workdir) / "search_stage.json").exists():
        jobs.append(Job("search", [PY, "-m", "benchmarks.search", "--stage", "finetune", "--workdir",
                                   a.search_workdir, "--device", a.device, "--workers", str(a.ft_workers), "--compare-top", "3",
                                   "--finetune-steps", str(a.finetune_steps or ft_epochs * 352), "--name", a.search_name,
                                   *shlex.split(a.search_args)], logs,
                        [RESULTS / f"{a.search_name}.json", Path(a.search_workdir).resolve() / f"{a.search_name}_finetune.png"]).start())
    if epochs:
        for v in [v for v in a.variants.split(",") if v]:
            jobs.append(Job(v, [PY, "-m", "benchmarks.dynamic", "--device", a.device, "--no-latency", "--no-uniform",
                                "--train-limit", str(a.train_limit), "--epochs", str(epochs), "--threads", "2",
                                "--name", v, *DYNAMIC_VARIANTS[v]], logs,
                            [RESULTS / f"{v}.json", RESULTS / f"{v}_run"]).start())
    wait(jobs, end)
    for j in jobs:
        batch["jobs"][j.name] = j.summary()
    for j in [*done, *jobs]:
        with tarfile.open(out / f"{j.name}.tar.gz", "w:gz") as tar:
            for f in j.files:
                if f.exists():
                    tar.add(f, arcname=str(f.relative_to(RESULTS.parent.parent)))
            tar.add(j.log, arcname=f"logs/{j.log.name}")
    batch["wall_s"] = round(time.time() - t_start, 1)
    (out / "batch.json").write_text(json.dumps(batch, indent=2) + "\n")
    print(json.dumps(batch["jobs"], indent=1))
    for j in [*done, *jobs]:
        if j.rc != 0:
            print(f"--- {j.name} (rc {j.rc}) log tail ---\n" + "\n".join(j.log.read_text().splitlines()[-15:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
