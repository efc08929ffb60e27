"""FP32 training of zoo models and their ONNX export (BatchNormalization kept for `qtool fuse`).

SGD with Nesterov momentum and a one-cycle schedule: it reaches ResNet-paper accuracy in a
fraction of the paper's 64k iterations, which matters on a 2-core CPU. Transformers train with
AdamW (`optimizer="adamw"`) and label smoothing instead. Training state is saved after every epoch
(`OUT.resume.pt`) and a run of the same config picks up from it: a run of hours on a CPU survives
being stopped.
"""
from __future__ import annotations

import io
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch
import torch.nn as nn

from qtool.data import ImageDataset, augment_cifar, load_dataset
from qtool.errors import QtoolError
from qtool.io import atomic_write_bytes, check_output_path, save_model
from qtool.models import build_model
from qtool.preprocess import Preprocess, write_preprocess
from qtool.progress import progress
from qtool.trainloop import EpochMeter, split_decay, supervised, train_loop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    model: str = "resnet20"
    data: str = "digits"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.2
    weight_decay: float = 5e-4
    momentum: float = 0.9
    augment: bool = True
    seed: int = 0
    threads: int | None = None
    optimizer: str = "sgd"  # "sgd" (Nesterov) or "adamw"
    label_smoothing: float = 0.0
    warmup: float = 0.25  # fraction of the steps the one-cycle schedule rises

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise QtoolError(f"--optimizer must be sgd or adamw, not {self.optimizer!r}")
        if not 0 <= self.label_smoothing < 1:
            raise QtoolError("--label-smoothing must be in [0, 1)")
        if not 0 < self.warmup < 1:
            raise QtoolError("--warmup must be in (0, 1)")
        if self.epochs < 1:
            raise QtoolError("--epochs must be >= 1")
        if self.batch_size < 1:
            raise QtoolError("--batch-size must be >= 1")
        if not self.lr > 0:
            raise QtoolError("--lr must be > 0")


@dataclass
class TrainResult:
    onnx_path: str
    checkpoint: str
    epochs: int
    wall_time_s: float
    train_acc: float
    val_acc_torch: float
    val_acc_onnx: float
    history: list

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def evaluate_torch(model: nn.Module, ds: ImageDataset, pre: Preprocess, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            x = torch.from_numpy(pre.apply(ds.images[i:i + batch_size]))
            correct += (model(x).argmax(1).numpy() == ds.labels[i:i + batch_size]).sum()
    return float(correct) / len(ds)


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], pre: Preprocess, opset: int = 17) -> onnx.ModelProto:
    """torch -> ONNX with a dynamic batch, BN kept (PRESERVE on an eval-mode model) and the
    preprocessing stored in metadata."""
    model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the exporter's deprecation and constant-folding chatter
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *input_shape),), buf, dynamo=False, opset_version=opset,
                          training=torch.onnx.TrainingMode.PRESERVE, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    m = onnx.load_from_string(buf.getvalue())
    write_preprocess(m, pre)
    m.producer_name = "qtool"
    return m


def train(cfg: TrainConfig, out: str | Path, checkpoint: str | Path | None = None, quiet: bool = False) -> TrainResult:
    out = check_output_path(out)
    ckpt = Path(checkpoint) if checkpoint else out.with_suffix(".pt")
    check_output_path(ckpt)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_ds, val_ds = load_dataset(cfg.data, "train"), load_dataset(cfg.data, "val")
    pre = train_ds.preprocess
    c = train_ds.shape[0]
    model = build_model(cfg.model, num_classes=len(train_ds.classes), in_channels=c)
    x_all = torch.from_numpy(pre.apply(train_ds.images))
    y_all = torch.from_numpy(train_ds.labels)
    steps_per_epoch = (len(train_ds) + cfg.batch_size - 1) // cfg.batch_size
    decay, no_decay = split_decay(model.parameters())  # no weight decay on BN, LayerNorm and biases
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0}]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                                                pct_start=cfg.warmup, div_factor=10, final_div_factor=100)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    history, done, before = [], 0, 0.0
    resume = out.with_suffix(".resume.pt")
    state = _load_resume(resume, cfg)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["rng"])
        history, done, before = state["history"], state["epoch"], state["elapsed_s"]
        log.info("resuming %s after epoch %d of %d (%s)", cfg.model, done, cfg.epochs, resume)
    t0 = time.perf_counter() - before
    with progress(disable=quiet) as bar:
        task = bar.add_task(f"train {cfg.model}", total=cfg.epochs * steps_per_epoch,
                            completed=done * steps_per_epoch, info="")
        for epoch in range(done, cfg.epochs):
            meter = EpochMeter()

            def batches():
                # The whole set is preprocessed once (x_all); a batch is a slice of this epoch's permutation.
                perm = torch.randperm(len(train_ds), generator=gen)
                for s in range(steps_per_epoch):
                    idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                    xb, yb = x_all[idx], y_all[idx]
                    if cfg.augment and xb.shape[-1] >= 16 and c == 3:
                        xb = augment_cifar(xb, gen)
                    yield xb, yb

            train_loop(model, batches(), supervised(model, loss_fn), [opt], sched, meter=meter,
                       on_step=lambda i, loss: bar.update(task, advance=1, info=meter.info(epoch, cfg.epochs)))
            val_acc = evaluate_torch(model, val_ds, pre)
            history.append({"epoch": epoch + 1, "loss": meter.loss, "train_acc": meter.acc,
                            "val_acc": val_acc, "elapsed_s": round(time.perf_counter() - t0, 1)})
            if not quiet:
                bar.console.print(f"epoch {epoch + 1}: loss {meter.loss:.4f} train {meter.acc:.4f} val {val_acc:.4f}")
            if epoch + 1 < cfg.epochs:
                _save_resume(resume, cfg, model, opt, sched, gen, history, epoch + 1, time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    _torch_save({"model": cfg.model, "state_dict": model.state_dict(), "config": asdict(cfg)}, ckpt)
    m = export_onnx(model, train_ds.shape, pre)
    save_model(m, out)
    from qtool.evaluation import evaluate_model

    onnx_acc = evaluate_model(m, cfg.data).accuracy
    resume.unlink(missing_ok=True)
    return TrainResult(str(out), str(ckpt), cfg.epochs, wall, history[-1]["train_acc"], history[-1]["val_acc"],
                       onnx_acc, history)


def _torch_save(obj, path: Path) -> None:
    """torch.save, written atomically (a stopped run leaves the previous file whole)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _save_resume(path: Path, cfg: TrainConfig, model, opt, sched, gen, history, epoch: int, elapsed: float) -> None:
    _torch_save({"config": asdict(cfg), "epoch": epoch, "elapsed_s": elapsed, "history": history,
                "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "gen": gen.get_state(), "rng": torch.get_rng_state()}, path)


def _load_resume(path: Path, cfg: TrainConfig) -> dict | None:
    """The state a stopped run of the same config left, or None (none, or another config's)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise QtoolError(f"cannot load training state {path} safely: {str(e).splitlines()[0]}") from None
    if state.get("config") != asdict(cfg):
        log.warning("%s is from another training config; starting afresh", path)
        return None
    return state


def load_checkpoint(path: str | Path, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Weights only: a checkpoint never runs code (torch.load(weights_only=True))."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise QtoolError(f"cannot load checkpoint {path} safely: {str(e).splitlines()[0]}") from None
    model = build_model(ck["model"], num_classes=num_classes, in_channels=in_channels)
    model.load_state_dict(ck["state_dict"])
    return model
