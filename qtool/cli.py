"""The `qtool` command line: a thin click skin over the Python API (one API call per command).

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback), 1 internal error.
"""
from __future__ import annotations

import logging
import os
import re
import sys

import click

from qtool.errors import QtoolError

DATA_HELP = ("data SPEC: digits (embedded default) | cifar10:PATH (python batches dir, ImageFolder dir with "
             "train/ and/or test/, or a .tar.gz of one) | imagefolder:PATH | npz:PATH")


def parse_bits(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"w(\d+)a(\d+)", text.strip().lower())
    if not m:
        raise QtoolError(f"--bits must look like w8a8 or w4a4, got {text!r}")
    w, a = int(m.group(1)), int(m.group(2))
    for v, what in ((w, "weight"), (a, "activation")):
        if not 2 <= v <= 8:
            raise QtoolError(f"{what} bits must be in 2..8, got {v}")
    return w, a


def parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise QtoolError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise QtoolError(f"{what} is empty")
    return vals


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise QtoolError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise QtoolError(f"{what} values must be >= 1, got {text!r}")
    return vals


def echo(msg: str = "") -> None:
    click.echo(msg)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log what passes did and refused (DEBUG level).")
@click.version_option(package_name="qtool")
def cli(verbose: bool):
    """qtool: quantize ONNX models into INT8 / mixed-precision ONNX files that run on stock onnxruntime.

    Typical flow: train (or bring a model) -> fuse -> quantize (PTQ) or qat -> export -> eval / bench.
    Run `qtool demo` for the whole flow on the embedded digits data, offline, in a few minutes.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.option("--model", "model_name", default="resnet20", show_default=True, help="zoo model: resnet20/32/44/56, mobilenetv2, lenet5, vgg_small, resnet18")
@click.option("--data", default="digits", show_default=True, help=DATA_HELP)
@click.option("--epochs", default=10, show_default=True, type=int)
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--lr", default=0.2, show_default=True, type=float, help="peak learning rate of the one-cycle schedule")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("-o", "--output", required=True, help="ONNX file to write (a .pt checkpoint is written beside it)")
def train(model_name, data, epochs, batch_size, lr, seed, output):
    """Train a zoo model in FP32 and export it to ONNX (BatchNormalization kept, preprocessing in metadata)."""
    from qtool.training import TrainConfig, train as run

    r = run(TrainConfig(model=model_name, data=data, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed), output)
    echo(f"val accuracy: PyTorch {r.val_acc_torch:.4f}, ONNX on onnxruntime {r.val_acc_onnx:.4f} "
         f"({r.wall_time_s:.0f} s) -> {r.onnx_path} (checkpoint {r.checkpoint})")


@cli.command()
@click.argument("model")
@click.option("-o", "--output", required=True, help="fused ONNX file to write")
@click.option("--verbose", is_flag=True, help="also list refusals (why a fusion did not fire)")
def fuse(model, output, verbose):
    """Fold BatchNormalization and constant Mul/Add into Conv/Gemm/MatMul, simplify (onnxsim), and mark
    Conv/Gemm/MatMul + activation groups as single quantization units."""
    from qtool.fusion import fuse_file

    for line in fuse_file(model, output, verbose=verbose).lines():
        echo(line)


@cli.command()
@click.argument("model")
@click.option("--data", default="digits", show_default=True, help=DATA_HELP + " (calibration images come from its train split)")
@click.option("--calib", default="mse", show_default=True, type=click.Choice(["minmax", "percentile", "entropy", "mse"]))
@click.option("--bits", default="w8a8", show_default=True, help="weight/activation bits, e.g. w8a8")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="weight scale granularity")
@click.option("--symmetric-activations", is_flag=True, help="int8 symmetric activations (S8S8; slower than the default U8S8 on x86 CPUs)")
@click.option("--format", "fmt", default="qdq", show_default=True, type=click.Choice(["qdq", "qoperator"]))
@click.option("--calib-size", default=512, show_default=True, type=int, help="number of calibration images")
@click.option("--mean", default=None, help="per-channel mean, e.g. 0.49,0.48,0.45 (overrides model metadata)")
@click.option("--std", default=None, help="per-channel std (overrides model metadata)")
@click.option("-o", "--output", required=True)
@click.option("--plan-out", default=None, help="also write the QuantPlan JSON here")
def quantize(model, data, calib, bits, per_channel, symmetric_activations, fmt, calib_size, mean, std, output, plan_out):
    """Post-training quantization: calibrate on real data and write a QDQ model (+ its QuantPlan)."""
    w, a = parse_bits(bits)
    from qtool.ptq import quantize_cli

    summary = quantize_cli(model, output, data=data, calib=calib, weight_bits=w, act_bits=a, per_channel=per_channel,
                           act_signed=symmetric_activations, fmt=fmt, calib_size=calib_size,
                           mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"), plan_out=plan_out)
    for line in summary.lines():
        echo(line)


@cli.command()
@click.argument("model")
@click.option("--data", default="digits", show_default=True, help=DATA_HELP)
@click.option("--bits", default=None, help="uniform bits, e.g. w4a4 (first conv / last FC stay 8-bit); w8a8 when no --plan/--config")
@click.option("--plan", default=None, help="QuantPlan JSON giving per-tensor bits")
@click.option("--config", default=None, help="YAML config (NNI config_list style)")
@click.option("--algo", default="lsq", show_default=True, type=click.Choice(["minmax", "ema", "lsq", "pact", "dorefa", "bnn"]))
@click.option("--epochs", default=1, show_default=True, type=int)
@click.option("--lr", default=None, type=float, help="peak learning rate of the cosine schedule [sgd 0.01, adam 1e-4]")
@click.option("--optimizer", default="sgd", show_default=True, type=click.Choice(["sgd", "adam"]))
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--train-limit", default=None, type=int, help="train on N images of the train split")
@click.option("-o", "--output", required=True)
@click.option("--plan-out", default=None, help="also write the learned QuantPlan JSON here")
def qat(model, data, bits, plan, config, algo, epochs, lr, optimizer, batch_size, train_limit, output, plan_out):
    """Quantization-aware training on a PyTorch module lifted from the ONNX graph; writes a QDQ model."""
    from qtool.qat_train import qat_file

    result = qat_file(model, output, data=data, bits=parse_bits(bits) if bits is not None else None, plan=plan, config=config, algo=algo, epochs=epochs, lr=lr,
                      batch_size=batch_size, train_limit=train_limit, optimizer=optimizer, plan_out=plan_out)
    for line in result.lines():
        echo(line)
    echo(f"wrote {output}" + (f" and plan {plan_out}" if plan_out else ""))


@cli.command()
@click.argument("model")
@click.option("--data", default="digits", show_default=True, help=DATA_HELP)
@click.option("--objectives", default="acc,flops", show_default=True, help="acc,flops[,bitops,size,packed_size,latency]")
@click.option("--bits", default="2,4,8", show_default=True, help="candidate bit-widths")
@click.option("--pop", default=16, show_default=True, type=int)
@click.option("--gens", default=10, show_default=True, type=int)
@click.option("--eval", "evaluator", default="supernet", show_default=True, type=click.Choice(["supernet", "qat"]))
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray"]))
@click.option("--workers", default=1, show_default=True, type=int, help="parallel evaluations (local: 1 = in-process)")
@click.option("--workdir", required=True, help="log, checkpoints, front.json/csv and plots go here")
@click.option("--resume", is_flag=True, help="continue a search in --workdir, reusing every logged evaluation")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--train-limit", default=None, type=int, help="use N training images (supernet / QAT fine-tune)")
@click.option("--val-limit", default=None, type=int, help="score on the first N validation images")
@click.option("--supernet-epochs", default=1.0, show_default=True, type=float)
@click.option("--qat-steps", default=100, show_default=True, type=int, help="fine-tune steps per candidate (--eval qat)")
@click.option("--qat-distill", default=0.0, show_default=True, type=float,
              help="weight in [0, 1] of the FP32 model's soft labels in each fine-tune's loss (--eval qat)")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--lr", default=0.002, show_default=True, type=float,
              help="SGD learning rate of the supernet / fine-tunes (from a trained model: 0.01 cost W8A8 2 points in 60 steps)")
@click.option("--fixed-bits", default=8, show_default=True, type=int, help="bits of the first and last layer (0: search them)")
@click.option("--max-size", default=None, type=float, help="constraint: QDQ file bytes")
@click.option("--max-latency", default=None, type=float, help="constraint: ORT batch-1 latency in ms")
@click.option("--random-init", is_flag=True,
              help="start NSGA-III from random genes only (default: the uniform W8A8, W4A8, ..., W2A2 members first)")
@click.option("--device", default="cpu", show_default=True, help="torch device of the supernet / fine-tunes: cpu or cuda[:N]")
@click.option("--sandwich-low", default=None, type=int,
              help="bits of the supernet sandwich's small end, trained every step [default: the smallest of --bits]; "
                   "4 stops it over-training the 2-bit paths (random configurations still draw every bit-width)")
def search(model, data, objectives, bits, pop, gens, evaluator, executor, workers, workdir, resume, seed, train_limit,
           val_limit, supernet_epochs, qat_steps, qat_distill, batch_size, lr, fixed_bits, max_size, max_latency,
           random_init, device, sandwich_low):
    """NSGA-III search over per-layer weight/activation bit-widths."""
    from qtool.bitsearch import search_cli

    search_cli(model, data=data, objectives=objectives, bits=bits, pop=pop, gens=gens, evaluator=evaluator,
               executor=executor, workers=workers, workdir=workdir, resume=resume, seed=seed, train_limit=train_limit,
               val_limit=val_limit, supernet_epochs=supernet_epochs, qat_steps=qat_steps, batch_size=batch_size, lr=lr,
               fixed_bits=fixed_bits, max_size=max_size, max_latency=max_latency, seed_uniform=not random_init,
               device=device, sandwich_low=sandwich_low, qat_distill=qat_distill)


@cli.command()
@click.argument("model")
@click.option("--data", default="digits", show_default=True, help=DATA_HELP)
@click.option("--bits", default="3,4,5", show_default=True, help="candidate bit-widths of every dynamic layer (weights and activations share the choice)")
@click.option("--target-bitflops", "target", default="u4", show_default=True, help="BitFLOPs per sample (sum MACs x b_w x b_a), or uB: those of uniform B bits")
@click.option("--epochs", default=1, show_default=True, type=int)
@click.option("--penalty", default="bitflops", show_default=True, type=click.Choice(["bitflops", "meanbits"]))
@click.option("--alpha", default=0.05, show_default=True, type=float, help="weight of the budget penalty")
@click.option("--train-limit", default=None, type=int, help="train on N images of the train split")
@click.option("--val-limit", default=None, type=int, help="evaluate on the first N validation images")
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--lr", default=1e-3, show_default=True, type=float,
              help="SGD learning rate of the network (BN is folded: higher rates diverge on ResNet-20)")
@click.option("--controller-lr", default=1e-2, show_default=True, type=float, help="Adam learning rate of the bit controller")
@click.option("--budget", default="batch", show_default=True, type=click.Choice(["batch", "sample"]),
              help="hinge the penalty on the batch's mean BitFLOPs (an average budget) or on every sample")
@click.option("--max-configs", default=8, show_default=True, type=int, help="configurations deployed (one QDQ model each)")
@click.option("--uniform-baselines", is_flag=True, help="also train static QAT at every uniform bit-width")
@click.option("--controller-conv", default=0, show_default=True, type=int,
              help="channels of a 3x3 conv in the controller before its pooling (0: pool the stem output directly)")
@click.option("--controller-layers", default=1, show_default=True, type=int,
              help="the controller reads the output of the first N quantizable layers, which stay static (the first "
                   "at 8 bits, the others at the middle of --bits); 1 = the stem's output")
@click.option("--granularity", default="layer", show_default=True, type=click.Choice(["layer", "global"]),
              help="the controller picks bits per layer, or one bit-width per image for every layer (global)")
@click.option("--estimator", default="gumbel", show_default=True, type=click.Choice(["gumbel", "expected"]),
              help="how the controller learns: hard Gumbel-softmax samples, or (with --granularity global) every "
                   "image through each bit-width, the loss averaged under the controller's probabilities")
@click.option("--distill", default=0.0, show_default=True, type=float,
              help="weight in [0, 1] of the FP32 model's soft labels in the loss (knowledge distillation; the static "
                   "baseline gets the same)")
@click.option("--device", default="cpu", show_default=True, help="torch device of training: cpu or cuda[:N]")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("-o", "--output", required=True, help="output directory (reports, controller.onnx, configs/)")
def dynamic(model, data, bits, target, epochs, penalty, alpha, train_limit, val_limit, batch_size, lr, controller_lr,
            budget, max_configs, uniform_baselines, controller_conv, controller_layers, granularity, estimator, distill,
            device, seed, output):
    """Instance-aware dynamic bit-widths (DQNet): train a bit controller, compare with static QAT, deploy on ORT."""
    from qtool.dynbits import dynamic_cli

    for line in dynamic_cli(model, output, data=data, bits=bits, target=target, epochs=epochs, penalty=penalty,
                            alpha=alpha, train_limit=train_limit, val_limit=val_limit, batch_size=batch_size,
                            lr=lr, controller_lr=controller_lr, budget=budget, max_configs=max_configs, seed=seed,
                            uniform_baselines=uniform_baselines, controller_conv=controller_conv,
                            controller_layers=controller_layers, granularity=granularity, estimator=estimator,
                            distill=distill, device=device).lines():
        echo(line)


@cli.command()
@click.argument("model", required=False)
@click.option("--plan", default=None, help="QuantPlan JSON (tensor names of the fused graph)")
@click.option("--from-search", default=None, help="search workdir")
@click.option("--pick", default=None, type=int, help="front member to export")
@click.option("--int8", is_flag=True, help="export an integer model (required)")
@click.option("--format", "fmt", default="qdq", show_default=True, type=click.Choice(["qdq", "qoperator", "integer"]))
@click.option("--int4-weights", "int4", default="auto", show_default=True, type=click.Choice(["auto", "on", "off"]),
              help="qdq: pack weights of <= 4 bits as INT4 (auto: only if onnxruntime keeps integer kernels)")
@click.option("--requant", default="fixedpoint", show_default=True, type=click.Choice(["fixedpoint", "pot"]),
              help="integer: fixed-point multiplier + shift, or shift only (power-of-two scale ratios)")
@click.option("-o", "--output", required=True)
def export(model, plan, from_search, pick, int8, fmt, int4, requant, output):
    """Export a fused graph + QuantPlan to a deployable ONNX file (QDQ, QOperator or integer-only)."""
    from qtool.exporting import export_cli

    for line in export_cli(model, output, plan=plan, from_search=from_search, pick=pick, int8=int8, fmt=fmt,
                           int4=int4, requant=requant).lines():
        echo(line)


@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--ep", default="cpu", show_default=True, help="execution providers: cpu,cuda,tensorrt")
@click.option("--batch", default="1", show_default=True, help="batch sizes, e.g. 1,32")
@click.option("--threads", default=2, show_default=True, type=int, help="intra-op threads")
@click.option("--warmup", default=10, show_default=True, type=int)
@click.option("--runs", default=100, show_default=True, type=int)
@click.option("--json", "json_out", default=None, help="write the report as JSON here")
def bench(models, ep, batch, threads, warmup, runs, json_out):
    """Latency (median/p90/p99), throughput and ratio vs the first model on onnxruntime EPs."""
    from qtool.latency import bench as run
    from qtool.io import check_output_path

    if json_out:
        check_output_path(json_out, *models)
    eps = tuple(e.strip() for e in ep.split(",") if e.strip())
    report = run(list(models), eps=eps, batches=parse_ints(batch, "--batch"), threads=threads, warmup=warmup, runs=runs)
    from rich.console import Console

    console = Console()
    console.width = max(console.width, 150)  # the table has 10 columns: never truncate numbers
    console.print(report.table())
    if json_out:
        report.to_json(json_out)


@cli.command(name="eval")
@click.argument("model")
@click.option("--data", default="digits", show_default=True, help=DATA_HELP)
@click.option("--split", default="val", show_default=True, type=click.Choice(["val", "test"]))
@click.option("--batch-size", default=256, show_default=True, type=int)
@click.option("--mean", default=None, help="per-channel mean (for models without qtool metadata)")
@click.option("--std", default=None, help="per-channel std")
def eval_cmd(model, data, split, batch_size, mean, std):
    """Top-1 accuracy on onnxruntime."""
    from qtool.evaluation import evaluate_model
    from qtool.io import load_model

    r = evaluate_model(load_model(model), data, split, batch_size, parse_floats(mean, "--mean"), parse_floats(std, "--std"))
    echo(f"top-1 {r.accuracy * 100:.2f}% on {r.n} images ({data}, {split})")


@cli.command()
@click.option("--workdir", default="demo-out", show_default=True, help="where the demo writes its models")
@click.option("--epochs", default=8, show_default=True, type=int, help="FP32 training epochs")
@click.option("--qat-epochs", default=2, show_default=True, type=int)
def demo(workdir, epochs, qat_epochs):
    """The whole flow on the embedded digits data, offline: train -> fuse -> quantize -> qat -> export -> eval -> bench."""
    from qtool.demo import run_demo

    run_demo(workdir, epochs=epochs, qat_epochs=qat_epochs)


def main(argv=None) -> int:
    try:
        cli.main(args=argv, prog_name="qtool", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("qtool: aborted", err=True)
        return 1
    except click.ClickException as e:  # usage errors: one line, exit 2
        click.echo(f"qtool: error: {e.format_message()}", err=True)
        return 2
    except QtoolError as e:
        click.echo(f"qtool: error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("qtool: interrupted", err=True)
        return 130
    except Exception as e:  # internal error: still one line unless debugging
        if os.environ.get("QTOOL_DEBUG"):
            raise
        click.echo(f"qtool: internal error ({type(e).__name__}): {e} (set QTOOL_DEBUG=1 for a traceback)", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
