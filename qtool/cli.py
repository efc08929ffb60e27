"""The `qtool` command line: a thin click skin over the Python API (`qtool.api`, one call per command).

The only module that parses command-line strings, names flags or imports click.

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback), 1 internal error.
"""
from __future__ import annotations

import logging
import os
import re
import sys

import click

from qtool.errors import QtoolError

DATA_HELP = ("data SPEC: digits (embedded; the default where it fits the model) | cifar10:PATH (python batches dir, "
             "ImageFolder dir with train/ and/or test/, or a .tar.gz of one) | imagefolder:PATH | npz:PATH (images + "
             "labels, or one array per model input named like it, any dtype/rank, optional 'labels') | images:DIR "
             "(image files of any size, resized and center-cropped to the model's input; no labels)")


def parse_bits(text: str, weights_only: bool = False) -> tuple[int, int | None]:
    """(weight bits, activation bits) of w8a8; with `weights_only` (quantize --activations none), of w4:
    (4, None)."""
    m = re.fullmatch(r"w(\d+)(?:a(\d+))?", text.strip().lower())
    if not m or (m.group(2) is None) != weights_only:
        if weights_only:
            raise QtoolError(f"--activations none quantizes weights only: --bits must look like w4, got {text!r}")
        raise QtoolError(f"--bits must look like w8a8 or w4a4, got {text!r}"
                         + (" (weights-only w4 goes with --activations none)" if m else ""))
    w, a = int(m.group(1)), (int(m.group(2)) if m.group(2) else None)
    for v, what in ((w, "weight"), (a, "activation")):
        if v is not None and not 2 <= v <= 8:
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


def parse_names(text: str, what: str) -> tuple[str, ...]:
    names = tuple(v.strip().lower() for v in text.split(",") if v.strip())
    if not names:
        raise QtoolError(f"{what} is empty")
    return names


def parse_weights(text: str | None, what: str) -> tuple[tuple[str, float], ...]:
    """out1=1,out2=0.5 -> ((out1, 1.0), (out2, 0.5)); each item splits on its last "="."""
    if text is None:
        return ()
    out = []
    for item in (v.strip() for v in text.split(",")):
        name, sep, w = item.rpartition("=")
        try:
            out.append((name, float(w)))
        except ValueError:
            name = ""
        if not sep or not name:
            raise QtoolError(f"{what} must look like out1=1,out2=0.5, got {text!r}")
    return tuple(out)


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
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


def data_options(f):
    """--data, --mean/--std, --input-shape: where the data comes from and how the model is fed."""
    f = click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:1x3x640x640",
                     help="fix an input's symbolic dims where the data does not give them (repeatable)")(f)
    f = click.option("--std", default=None, help="per-channel std, e.g. 0.25,0.24,0.26 (overrides model metadata)")(f)
    f = click.option("--mean", default=None, help="per-channel mean, e.g. 0.49,0.48,0.45 (overrides model metadata)")(f)
    return click.option("--data", default=None, help=DATA_HELP)(f)


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition(":")
    try:
        shape = tuple(int(v) for v in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(v < 1 for v in shape):
        raise QtoolError(f"--input-shape must look like NAME:1x3x640x640, got {text!r}")
    return name, shape


def make_data(data: str | None, mean: str | None, std: str | None, input_shapes: tuple[str, ...] = ()):
    """The qtool.Data of the options; None when nothing was given (the API then uses digits where it fits)."""
    from qtool.data import Data

    if data is None and mean is None and std is None and not input_shapes:
        return None
    return Data(data or "digits", parse_floats(mean, "--mean"), parse_floats(std, "--std"),
                tuple(parse_input_shape(t) for t in input_shapes))


def checked_outputs(inputs: tuple, *outputs) -> None:
    """Refuse bad output paths before any work: missing folder, an input, two outputs the same."""
    from qtool.io import check_output_path

    given = [o for o in outputs if o is not None]
    for o in given:
        check_output_path(o, *inputs)
    if len({os.path.abspath(o) for o in given}) < len(given):
        raise QtoolError(f"two outputs are the same path: {given[0]}")


@cli.command()
@click.option("--model", "model_name", default="resnet20", show_default=True, help="zoo model: resnet20/32/44/56, mobilenetv2, mobilenetv2_050, vit_cifar, lenet5, digitnet, vgg_small, resnet18")
@click.option("--data", default="digits", show_default=True, help=DATA_HELP)
@click.option("--epochs", default=10, show_default=True, type=int)
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--lr", default=0.2, show_default=True, type=float, help="peak learning rate of the one-cycle schedule")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True,
              help="sgd (Nesterov, for CNNs) or adamw (for vit_cifar, with e.g. --lr 1e-3 --weight-decay 0.05)")
@click.option("--weight-decay", default=5e-4, show_default=True, type=float)
@click.option("--label-smoothing", default=0.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("-o", "--output", required=True, help="ONNX file to write (a .pt checkpoint is written beside it)")
def train(model_name, data, epochs, batch_size, lr, optimizer, weight_decay, label_smoothing, seed, output):
    """Train a zoo model in FP32 and export it to ONNX (BatchNormalization kept, preprocessing in metadata).

    The training state is saved after each epoch (OUTPUT.resume.pt): run the same command again to
    continue a stopped run."""
    import qtool

    r = qtool.train(qtool.TrainConfig(model=model_name, data=data, epochs=epochs, batch_size=batch_size, lr=lr,
                                      optimizer=optimizer, weight_decay=weight_decay,
                                      label_smoothing=label_smoothing, seed=seed), output)
    echo(f"val accuracy: PyTorch {r.val_acc_torch:.4f}, ONNX on onnxruntime {r.val_acc_onnx:.4f} "
         f"({r.wall_time_s:.0f} s) -> {r.onnx_path} (checkpoint {r.checkpoint})")


@cli.command()
@click.argument("model")
@click.option("-o", "--output", required=True, help="fused ONNX file to write")
@click.option("--no-onnxsim", is_flag=True, help="skip onnxsim's simplification (folds only)")
@click.option("--verbose", is_flag=True, help="also list refusals (why a fusion did not fire)")
def fuse(model, output, no_onnxsim, verbose):
    """Fold BatchNormalization and constant Mul/Add into Conv/Gemm/MatMul, simplify (onnxsim), and mark
    Conv/Gemm/MatMul + activation groups as single quantization units."""
    import qtool

    checked_outputs((model,), output)
    if verbose:  # the passes log what they did and why they refused at DEBUG, while they run
        logging.getLogger().setLevel(logging.DEBUG)
    r = qtool.fuse(model, qtool.FuseConfig(use_onnxsim=not no_onnxsim))
    r.save(output)
    for line in r.summary.lines():
        echo(line)
    echo(f"wrote {output}")


def refine_options(f):
    """quantize's post-training refinements (QuantConfig.algo, adaround_*, tune_activations, qdrop, bias_correction,
    time_budget_s, seed)."""
    opts = [
        click.option("--algo", default="none", show_default=True,
                     type=click.Choice(["none", "adaround", "brecq", "gptq"]),
                     help="adaround: learned up/down rounding of the weights, layer by layer, on the calibration data; "
                          "brecq: the same, block by block (residual blocks), each block's output reconstructed; "
                          "gptq (with --activations none): Hessian-based rounding of the 4-bit blocks from --data"),
        click.option("--adaround-iters", default=500, show_default=True, type=int,
                     help="optimization steps per layer (adaround) / per block (brecq)"),
        click.option("--adaround-samples", default=256, show_default=True, type=int,
                     help="calibration samples the layers are reconstructed on (adaround, brecq, bias correction)"),
        click.option("--tune-activations", is_flag=True,
                     help="--algo brecq: also learn the activation scales of each block (LSQ gradient, from the "
                          "calibrated ones), written into the plan"),
        click.option("--qdrop", default=0.0, show_default=True, type=float, metavar="P",
                     help="--algo adaround / brecq: each element of a layer's (block's) input is the FP32 model's "
                          "with probability P, redrawn every step (QDrop; the paper's 0.5: +0.3 / +0.9 pp top-1 on "
                          "ResNet-20 at W4A8 / W4A4, -0.4 pp on MobileNetV2 W4A8: measure on yours)"),
        click.option("--bias-correction", is_flag=True,
                     help="empirical bias correction: each quantized Conv/Gemm's output mean per channel = FP32's"),
        click.option("--time-budget", "time_budget_s", default=None, type=float, metavar="SECONDS",
                     help="bound on the refinements' wall time (layers left when it runs out keep nearest rounding) "
                          "or the accuracy control's (it stops raising units; the report says the budget is not met)"),
        click.option("--seed", default=0, show_default=True, type=int, help="seed of the refinements' sampling"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def rescale_options(f):
    """quantize's FP32-equivalent rescalings before calibration (QuantConfig.equalize, smoothquant)."""
    f = click.option("--smoothquant", "smoothquant", default=None, type=float, metavar="ALPHA",
                     help="SmoothQuant: move activation outliers of LayerNorm outputs into the MatMul/Gemm weights "
                          "that read them, s = max|X|^ALPHA / max|W|^(1-ALPHA) per channel (0.5 is typical)")(f)
    return click.option("--equalize", is_flag=True,
                        help="cross-layer equalization of Conv -> (Relu)? -> Conv pairs (incl. depthwise): equal "
                             "per-channel weight ranges, same FP32 function")(f)


@cli.command()
@click.argument("model")
@data_options
@click.option("--calib", default="mse", show_default=True, type=click.Choice(["minmax", "percentile", "entropy", "mse"]))
@click.option("--bits", default=None, help="weight/activation bits, e.g. w8a8 (the default); with --activations none "
              "weights only: w4 (the default there)")
@click.option("--first-last-bits", default=None, type=int, metavar="N",
              help="bits of the first and last Conv/Gemm/MatMul (weights and inputs, the last one's output too), "
                   "e.g. 8 with --bits w4a4 as in `qtool qat` [default: --bits everywhere]")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="weight scale granularity")
@click.option("--symmetric-activations", is_flag=True, help="int8 symmetric activations (S8S8; slower than the default U8S8 on x86 CPUs)")
@click.option("--weight-range", default="auto", show_default=True, type=click.Choice(["auto", "full", "pair-safe"]),
              help="weight scales: pair-safe keeps onnxruntime's int16-saturating kernels (x86 without VNNI) exact; "
                   "auto does so where this CPU's kernels saturate; full: plain max scaling")
@click.option("--format", "fmt", default="qdq", show_default=True, type=click.Choice(["qdq", "qoperator"]))
@click.option("--calib-size", default=512, show_default=True, type=int, help="number of calibration images")
@click.option("-o", "--output", required=True)
@click.option("--plan-out", default=None, help="also write the QuantPlan JSON here")
@click.option("--report", "report_out", default=None, metavar="FILE",
              help="per-tensor SQNR vs FP32 on calibration samples, worst first: JSON here and a printed table")
@click.option("--exclude", "exclude", multiple=True, metavar="PATTERN",
              help="keep nodes in float: a node-name glob or an op type (repeatable), e.g. --exclude '/head/*'")
@click.option("--allow-collapse", is_flag=True,
              help="write the model even if its outputs collapse against FP32 (constant, NaN, SQNR < 1 dB)")
@click.option("--activations", default="static", show_default=True, type=click.Choice(["static", "dynamic", "none"]),
              help="static: activation ranges calibrated on --data, Q/DQ in the graph. dynamic: int8 MatMul/Gemm "
                   "weights, activations quantized at run time by onnxruntime (no calibration, --data optional: "
                   "then only the FP32 comparison). none: weight-only 4-bit MatMul/Gemm as onnxruntime's "
                   "MatMulNBits, activations float (--data optional, except for --algo gptq). Not `qtool dynamic`, "
                   "which trains per-input bit-widths.")
@click.option("--block-size", default=None, type=click.Choice(["16", "32", "64", "128", "256"]),
              help="--activations none: weights per scale along K [default: 32]")
@click.option("--weight-zero-points/--symmetric-weights", "weight_zero_points", default=None,
              help="--activations none: a uint4 zero point per block, or symmetric int4 blocks [default: zero points]")
@click.option("--max-drop", default=None, type=float, metavar="PP",
              help="accuracy control: per quantization unit float / int8 / w4a8 (--bits: the most aggressive), raised "
                   "until the top-1 drop vs FP32 (labels; else top-1 disagreement with FP32) is at most PP points on "
                   "evaluation samples disjoint from calibration (--val-data, else the data's val split, else the "
                   "samples after the first --calib-size)")
@click.option("--confidence", default=None, type=float, metavar="LEVEL",
              help="accuracy control: --max-drop must hold for the drop's one-sided upper confidence bound at LEVEL "
                   "(e.g. 0.9; paired over the evaluation samples), which guards against a drop that holds only on "
                   "the samples measured [default: the measured drop]")
@click.option("--min-sqnr", "min_sqnr_db", default=None, type=float, metavar="DB",
              help="accuracy control with --metric sqnr: the worst output's SQNR vs FP32 must reach DB")
@click.option("--metric", default="auto", show_default=True, type=click.Choice(["auto", "top1", "agreement", "sqnr"]),
              help="what --max-drop / --min-sqnr measure (auto: top1 with labels, else agreement)")
@click.option("--target", default="cpu", show_default=True, type=click.Choice(["cpu"]),
              help="where the model runs: the per-unit choices and whose latency the control measures")
@click.option("--val-data", default=None, metavar="SPEC", help="evaluation data of the accuracy control")
@click.option("--eval-size", default=None, type=int, help="accuracy control: evaluate on the first N samples")
@click.option("--candidates", default=4, show_default=True, type=int,
              help="accuracy control: units measured on onnxruntime per greedy step")
@rescale_options
@refine_options
def quantize(model, data, mean, std, input_shapes, calib, bits, first_last_bits, per_channel, symmetric_activations,
             weight_range, fmt, calib_size, output, plan_out, report_out, exclude, allow_collapse, activations, block_size,
             weight_zero_points, max_drop, confidence, min_sqnr_db, metric, target, val_data, eval_size, candidates,
             **refine):
    """Post-training quantization: calibrate on real data and write a QDQ model (+ its QuantPlan);
    --activations dynamic needs no data (activations are quantized at run time); --activations none
    writes weight-only 4-bit MatMulNBits (data only for --algo gptq)."""
    import qtool

    weights_only = activations == "none"
    w, a = parse_bits(bits or ("w4" if weights_only else "w8a8"), weights_only)
    extra = {}
    if weights_only:
        if block_size is not None:
            extra["block_size"] = int(block_size)
        if weight_zero_points is not None:
            extra["weight_symmetric"] = not weight_zero_points
    elif block_size is not None or weight_zero_points is not None:
        raise QtoolError("--block-size / --weight-zero-points / --symmetric-weights go with --activations none")
    config = qtool.QuantConfig(weight_bits=w, act_bits=8 if a is None else a, first_last_bits=first_last_bits,
                               calib=calib, per_channel=per_channel,
                               act_signed=symmetric_activations, act_symmetric=symmetric_activations,
                               calib_size=calib_size, format=fmt, check_collapse=not allow_collapse,
                               exclude=tuple(exclude), per_tensor_report=report_out is not None,
                               activations=activations, weight_range=weight_range, max_drop=max_drop,
                               confidence=confidence, min_sqnr_db=min_sqnr_db, metric=metric, target=target, eval_size=eval_size,
                               candidates=candidates, **extra, **refine)
    d = make_data(data, mean, std, input_shapes)
    if activations != "static" and report_out and d is None:
        raise QtoolError(f"--report compares against FP32 on data: give --data (--activations {activations} "
                         "needs none otherwise)")
    if refine.get("algo") == "gptq" and d is None:
        raise QtoolError("--algo gptq learns the rounding from calibration data: give --data")
    if val_data is not None and max_drop is None and min_sqnr_db is None:
        raise QtoolError("--val-data is the accuracy control's evaluation data: give --max-drop or --min-sqnr")
    v = make_data(val_data, mean, std, input_shapes) if val_data is not None else None
    checked_outputs((model,), output, plan_out, report_out)
    r = qtool.quantize(model, d, config, val_data=v)
    r.save(output, plan_out)
    echo(f"wrote {output}" + (f" and plan {plan_out}" if plan_out else ""))
    for line in r.lines():
        echo(line)
    for k, m in r.report.outputs.items():
        echo(f"vs FP32 on {r.report.samples} calibration samples: " + m.line(k))
    if r.control is not None and not r.control.met:
        click.echo(f"qtool: warning: the accuracy budget is not met ({r.control.stop}): "
                   f"final {r.control.metric} drop {r.control.final_drop:.2f} {r.control.unit}"
                   + (f" (upper bound {r.control.final_bound:.2f})" if r.control.final_bound is not None else "")
                   + ", budget "
                   f"{r.control.budget:g} {r.control.unit}", err=True)
    if report_out:
        r.report.save(report_out)
        from rich.console import Console

        console = Console()
        console.width = max(console.width, 120)
        console.print(r.report.table())
        echo(f"wrote {report_out}")


@cli.command()
@click.argument("model")
@data_options
@click.option("--bits", default=None, help="uniform bits, e.g. w4a4 (first conv / last FC stay 8-bit); w8a8 when no --plan/--config")
@click.option("--plan", default=None, help="QuantPlan JSON giving per-tensor bits; a plan with scales (qtool quantize "
              "--plan-out) is also where training starts: QAT begins at PTQ's scales, not at minmax calibration")
@click.option("--config", default=None, help="YAML config (NNI config_list style)")
@click.option("--algo", default="lsq", show_default=True, type=click.Choice(["minmax", "ema", "lsq", "pact", "dorefa", "bnn"]))
@click.option("--epochs", default=1, show_default=True, type=int)
@click.option("--lr", default=None, type=float, help="peak learning rate of the cosine schedule [sgd 0.01, adam 1e-4]")
@click.option("--optimizer", default="sgd", show_default=True, type=click.Choice(["sgd", "adam"]))
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--train-limit", default=None, type=int, help="train on N images of the train split")
@click.option("--loss", default="auto", show_default=True, type=click.Choice(["auto", "ce", "distill"]),
              help="ce: the labels' cross-entropy; distill: every output against the FP32 model's (KL for class "
                   "scores, MSE otherwise; no labels needed); auto: ce with labels and one class-score output")
@click.option("--loss-weights", default=None, metavar="OUT=W,...", help="distill: per-output weights, e.g. boxes=1,scores=0.5")
@click.option("--accept-fidelity", is_flag=True,
              help="write the model even if fake-quant and onnxruntime differ by > 1 quantization step or < 99% argmax")
@click.option("-o", "--output", required=True)
@click.option("--plan-out", default=None, help="also write the learned QuantPlan JSON here")
def qat(model, data, mean, std, input_shapes, bits, plan, config, algo, epochs, lr, optimizer, batch_size, train_limit,
        loss, loss_weights, accept_fidelity, output, plan_out):
    """Quantization-aware training on a PyTorch module lifted from the ONNX graph; writes a QDQ model."""
    import qtool
    from qtool.qat_config import load_config_list, load_plan_bits, load_plan_init

    if sum(v is not None for v in (bits, plan, config)) > 1:
        raise QtoolError("give only one of --bits, --plan and --config")
    kw: dict = {}
    if bits is not None:
        kw["weight_bits"], kw["act_bits"] = parse_bits(bits)
    elif plan is not None:
        kw["plan_bits"], kw["plan_init"] = load_plan_bits(plan), load_plan_init(plan)
    elif config is not None:
        kw["rules"] = load_config_list(config)
    cfg = qtool.QATConfig(algo=algo, epochs=epochs, lr=lr, batch_size=batch_size, train_limit=train_limit,
                          optimizer=optimizer, loss=loss, loss_weights=parse_weights(loss_weights, "--loss-weights"),
                          accept_fidelity=accept_fidelity, **kw)
    d = make_data(data, mean, std, input_shapes)
    checked_outputs((model,), output, plan_out)
    result = qtool.qat(model, d, cfg)
    result.save(output, plan_out)
    for line in result.lines():
        echo(line)
    echo(f"wrote {output}" + (f" and plan {plan_out}" if plan_out else ""))


@cli.command()
@click.argument("model")
@click.option("--data", default=None, help=DATA_HELP)
@click.option("--objectives", default=None,
              help="comma-separated of acc, flops, bitops, size, packed_size, latency [default: --target cpu "
                   "acc,latency; grid acc,flops]")
@click.option("--target", default="cpu", show_default=True, type=click.Choice(["cpu", "grid"]),
              help="what each layer chooses: cpu = float, int8 or w4a8 (4-bit weights in int8 containers), the "
                   "choices onnxruntime's CPU kernels reward; grid = weight and activation bits over --bits, for "
                   "hardware with sub-8-bit kernels")
@click.option("--bits", default=None, help="candidate bit-widths of --target grid [default: 2,4,8]")
@click.option("--pop", default=16, show_default=True, type=int)
@click.option("--gens", default=10, show_default=True, type=int)
@click.option("--eval", "evaluator", default="supernet", show_default=True, type=click.Choice(["supernet", "qat", "ptq"]),
              help="how a candidate is scored: supernet (one shared multi-bit net trained once, BN re-calibrated "
                   "per candidate), qat (a short QAT fine-tune each), ptq (plain PTQ of the candidate's bits, "
                   "scored on onnxruntime: no training, the deployed accuracy)")
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
@click.option("--qat-loss", default="auto", show_default=True, type=click.Choice(["auto", "ce", "distill"]),
              help="each fine-tune's loss, as qat --loss (--eval qat)")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--lr", default=0.002, show_default=True, type=float,
              help="SGD learning rate of the supernet / fine-tunes (from a trained model: 0.01 cost W8A8 2 points in 60 steps)")
@click.option("--fixed-bits", default=8, show_default=True, type=int,
              help="bits of the first and last layer (0: search them; --target cpu: 8 = int8 or 0)")
@click.option("--max-size", default=None, type=float, help="constraint: QDQ file bytes")
@click.option("--max-latency", default=None, type=float, help="constraint: ORT batch-1 latency in ms")
@click.option("--random-init", is_flag=True,
              help="start NSGA-III from random genes only (default: the uniform members first: cpu float, int8, "
                   "w4a8; grid W8A8, W4A8, ..., W2A2)")
@click.option("--device", default="cpu", show_default=True, help="torch device of the supernet / fine-tunes: cpu or cuda[:N]")
@click.option("--sandwich-low", default=None, type=int,
              help="--target grid: bits of the supernet sandwich's small end, trained every step [default: the smallest of --bits]; "
                   "4 stops it over-training the 2-bit paths (random configurations still draw every bit-width)")
def search(model, data, objectives, target, bits, pop, gens, evaluator, executor, workers, workdir, resume, seed,
           train_limit, val_limit, supernet_epochs, qat_steps, qat_distill, qat_loss, batch_size, lr, fixed_bits, max_size,
           max_latency, random_init, device, sandwich_low):
    """NSGA-III search over per-layer precision (float / int8 / w4a8, or weight/activation bit-widths)."""
    import qtool

    kw = {} if bits is None else {"bits": parse_ints(bits, "--bits")}
    config = qtool.SearchConfig(
        objectives=None if objectives is None else parse_names(objectives, "--objectives"), target=target, pop=pop,
        gens=gens, seed=seed, seed_uniform=not random_init, evaluator=evaluator, executor=executor, workers=workers,
        resume=resume, train_limit=train_limit, val_limit=val_limit, supernet_epochs=supernet_epochs,
        qat_steps=qat_steps, qat_distill=qat_distill, qat_loss=qat_loss, batch_size=batch_size, lr=lr, fixed_bits=fixed_bits,
        max_size=max_size, max_latency=max_latency, device=device, sandwich_low=sandwich_low, **kw)
    result = qtool.search(model, data, config, workdir=workdir)
    from rich.console import Console

    console = Console()
    console.width = max(console.width, 160)
    console.print(result.table())
    console.print(f"wrote {os.path.join(workdir, 'front.json')}, front.csv, pareto.png, bits_heatmap.png")


@cli.command()
@click.argument("model")
@click.option("--data", default=None, help=DATA_HELP)
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
    """Per-image bit-widths (DQNet; not `--activations dynamic`): a bit controller picks each image's bits,
    compared with static QAT at the same BitFLOPs and deployed on onnxruntime."""
    import qtool

    config = qtool.DynamicConfig(
        bits=parse_ints(bits, "--bits"), target=target, penalty=penalty, alpha=alpha, epochs=epochs,
        train_limit=train_limit, val_limit=val_limit, batch_size=batch_size, lr=lr, controller_lr=controller_lr,
        budget=budget, max_configs=max_configs, seed=seed, uniform_baselines=uniform_baselines,
        controller_conv=controller_conv, controller_layers=controller_layers, granularity=granularity,
        estimator=estimator, distill=distill, device=device)
    for line in qtool.dynamic(model, data, config, output_dir=output).lines():
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
    import qtool
    from qtool.exporting import search_member_files

    if not int8:
        raise QtoolError("export writes integer models only: pass --int8")
    if from_search is not None or pick is not None:
        if from_search is None or pick is None:
            raise QtoolError("--from-search DIR and --pick K go together")
        if model is not None or plan is not None:
            raise QtoolError("give either MODEL.onnx --plan P or --from-search DIR --pick K, not both")
        model, plan = search_member_files(from_search, pick)
    if model is None or plan is None:
        raise QtoolError("give MODEL.onnx and --plan plan.json (or --from-search DIR --pick K)")
    config = qtool.ExportConfig(format=fmt, int4=int4, requant=requant)
    checked_outputs((model, plan), output)
    result = qtool.export(model, plan, config)
    result.save(output)
    for line in result.report.lines():
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
    import qtool

    config = qtool.BenchConfig(eps=parse_names(ep, "--ep"), batches=parse_ints(batch, "--batch"), threads=threads,
                               warmup=warmup, runs=runs)
    if json_out:
        checked_outputs(models, json_out)
    report = qtool.bench(list(models), config)
    from rich.console import Console

    console = Console()
    console.width = max(console.width, 150)  # the table has 10 columns: never truncate numbers
    console.print(report.table())
    if json_out:
        report.to_json(json_out)


@cli.command(name="eval")
@click.argument("model")
@data_options
@click.option("--against", default=None, metavar="FP32.onnx",
              help="reference model: per output SQNR, cosine, max abs error and top-1 agreement (no labels needed)")
@click.option("--split", default="val", show_default=True, type=click.Choice(["val", "test"]))
@click.option("--batch-size", default=256, show_default=True, type=int)
@click.option("--limit", default=None, type=int, help="the first N samples of the split")
def eval_cmd(model, data, mean, std, input_shapes, against, split, batch_size, limit):
    """Top-1 on onnxruntime where the data has labels; with --against, label-free fidelity per output."""
    import qtool

    r = qtool.evaluate(model, make_data(data, mean, std, input_shapes),
                       qtool.EvalConfig(split=split, batch_size=batch_size, limit=limit), against=against)
    for line in r.lines():
        echo(line)


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
