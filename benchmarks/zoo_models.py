"""The zoo's models and data: architectures built from transformers config objects (random weights,
never from_pretrained, no hub), trained third-party ONNX files from PyPI wheels, and their feeds.

Every model is small (reduced depth / width, images 96-128, text sequences of 128) but real in
structure: the same blocks, norms, attention and heads as the published architectures. BatchNorm
layers get gamma/beta drawn away from 1/0 and running statistics re-estimated on the benchmark's own
images (`_reestimate_bn`), so activations carry signal and fidelity numbers mean something; `build`
checks that the FP32 outputs are not degenerate.

Data: the shared CIFAR-10 JPEGs (resized) where images matter, else a deterministic synthetic
fallback (smooth random fields); random token ids with padded attention masks for text;
deterministic waveforms (chirps + harmonics + noise) for audio. Feeds are written as npz keyed by
input name, which `qtool --data npz:PATH` reads.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from benchmarks.common import SHARED_CIFAR

CACHE = Path(os.environ.get("QTOOL_ZOO_CACHE", Path.home() / ".cache" / "qtool" / "zoo"))
SEQ = 128


@dataclass(frozen=True)
class Spec:
    key: str
    kind: str  # cnn | vit | text | audio | detector | segmenter | third-party
    desc: str
    build: Callable  # (n_calib, n_test) -> (fp32 ModelProto, calib feeds, test feeds)
    dynamic: bool = False  # also --activations dynamic vs quantize_dynamic (text / audio)
    note: str = field(default="")


# ------------------------------------------------------------------------------------------ data

POOL = 256  # CIFAR-10 images the zoo draws from (calibration + test)


def _cifar_pool() -> np.ndarray | None:
    """POOL CIFAR-10 JPEGs (uint8 N x 32 x 32 x 3), a fixed random draw over the 50k, cached in CACHE."""
    p = Path(os.environ.get("QTOOL_CIFAR", SHARED_CIFAR))
    if not p.is_file():
        return None
    cached = CACHE / f"cifar_pool_{POOL}.npz"
    if cached.is_file():
        return np.load(cached)["x"]
    from PIL import Image

    with tarfile.open(p) as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and m.name.lower().endswith(".jpg")),
                         key=lambda m: m.name)
        idx = np.random.default_rng(1234).permutation(len(members))[:POOL]
        out = []
        for i in idx:
            with Image.open(io.BytesIO(tf.extractfile(members[i]).read())) as im:
                out.append(np.asarray(im.convert("RGB"), np.uint8))
    x = np.stack(out)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(cached, x=x)
    return x


def _cifar_images(n: int, offset: int) -> np.ndarray | None:
    pool = _cifar_pool()
    if pool is None:
        return None
    if offset + n > len(pool):
        raise ValueError(f"{offset + n} images asked, the pool holds {len(pool)}")
    return pool[offset:offset + n]


_IMAGE_CACHE: dict = {}


def images(n: int, offset: int, h: int, w: int) -> tuple[np.ndarray, str]:
    """float32 N x 3 x H x W in [0, 1]: CIFAR-10 JPEGs resized, or smooth synthetic fields."""
    key = (n, offset)
    if key not in _IMAGE_CACHE:
        _IMAGE_CACHE[key] = _cifar_images(n, offset)
    raw = _IMAGE_CACHE[key]
    if raw is not None:
        from PIL import Image

        x = np.stack([np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR), np.float32) for a in raw])
        return x.transpose(0, 3, 1, 2) / 255.0, "CIFAR-10 JPEGs resized"
    rng = np.random.default_rng(offset + 7)
    base = rng.random((n, 3, 8, 8)).astype(np.float32)  # upsampled low-frequency noise: image-like spectra
    x = np.kron(base, np.ones((1, 1, -(-h // 8), -(-w // 8)), np.float32))[:, :, :h, :w]
    return np.clip(x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), 0, 1), "synthetic fields"


def tokens(n: int, seed: int, vocab: int, token_types: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (n, SEQ), dtype=np.int64)
    lengths = rng.integers(SEQ // 4, SEQ + 1, n)
    mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int64)
    ids[:, 0] = 1
    ids = np.where(mask == 1, ids, 0)
    out = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        out["token_type_ids"] = (np.arange(SEQ)[None] >= (lengths[:, None] // 2)).astype(np.int64) * mask
    return out


def waveforms(n: int, seed: int, samples: int, rate: int = 16000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / rate
    out = np.empty((n, samples), np.float32)
    for i in range(n):
        f0, f1 = rng.uniform(100, 400), rng.uniform(400, 3000)
        x = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * t[-1])))  # a chirp
        for k in range(2, 5):
            x += rng.uniform(0.1, 0.5) * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.3))
        x *= 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(1, 5) * t)  # syllable-like envelope
        x += 0.05 * rng.standard_normal(samples)
        out[i] = (x / np.abs(x).max()).astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------ torch -> ONNX

def _reestimate_bn(model, feeds: list[dict]) -> None:
    """Non-degenerate BatchNorm: gamma/beta away from 1/0, and running statistics set, layer by layer in
    forward order, to the mean / variance of the layer's input on the benchmark's images (a pre-hook
    sets them before the layer normalizes, so later layers see the already re-estimated earlier ones).
    Covers nn.BatchNorm* and the frozen BatchNorm of transformers' detectors alike."""
    import torch

    g = torch.Generator().manual_seed(0)
    bns = [m for m in model.modules() if "batchnorm" in type(m).__name__.lower()
           and hasattr(m, "running_mean") and hasattr(m, "running_var")]
    for m in bns:
        c = m.running_mean.numel()
        with torch.no_grad():
            m.weight.copy_(torch.rand(c, generator=g) * 0.8 + 0.6)
            m.bias.copy_(torch.rand(c, generator=g) * 0.4 - 0.1)

    def hook(mod, args):
        x = args[0]
        dims = [0] + list(range(2, x.dim()))
        mod.running_mean.copy_(x.mean(dims))
        mod.running_var.copy_(x.var(dims, unbiased=False))

    handles = [m.register_forward_pre_hook(hook) for m in bns]
    with torch.no_grad():
        model(**{k: torch.from_numpy(v) for k, v in feeds[0].items()})
    for h in handles:
        h.remove()


class _Outputs:
    """torch.nn.Module wrapper factory: the named outputs of a transformers model, as a tuple."""

    @staticmethod
    def wrap(model, input_names: list[str], outputs: list[str]):
        import torch

        class W(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = model

            def forward(self, *args):
                out = self.m(**dict(zip(input_names, args)))
                return tuple(getattr(out, o) for o in outputs)

        return W().eval()


def export(model, example: dict[str, np.ndarray], outputs: list[str], opset: int = 17) -> onnx.ModelProto:
    """torch.onnx.export (TorchScript exporter) with a dynamic batch axis only: qtool bench needs every
    other dimension fixed."""
    import torch

    names = list(example)
    w = _Outputs.wrap(model, names, outputs)
    args = tuple(torch.from_numpy(example[k][:1]) for k in names)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(w, args, buf, dynamo=False, opset_version=opset, input_names=names, output_names=outputs,
                          dynamic_axes={n: {0: "batch"} for n in names + outputs}, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def _check_not_degenerate(model: onnx.ModelProto, feeds: dict[str, np.ndarray], key: str) -> dict:
    """FP32 outputs on the test feeds must vary across samples and elements (else SQNR means nothing)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {k: v[:8] for k, v in feeds.items()})
    stats = {}
    for o, v in zip(sess.get_outputs(), outs):
        v = np.asarray(v, np.float64)
        std, across = float(v.std()), float(v.std(0).mean()) if len(v) > 1 else 0.0
        if not np.isfinite(v).all() or std < 1e-6 or across < 1e-6 * max(1.0, float(np.abs(v).mean())):
            raise RuntimeError(f"{key}: FP32 output {o.name} is degenerate (std {std:g}, across samples {across:g})")
        stats[o.name] = {"std": std, "std_across_samples": across, "abs_mean": float(np.abs(v).mean())}
    return stats


def _torch_model(key, make, example_calib, example_test, outputs, bn=True):
    import torch

    torch.manual_seed(0)
    m = make().eval()
    if bn:
        _reestimate_bn(m, [example_calib])
    return export(m, example_calib, outputs), example_calib, example_test


# ------------------------------------------------------------------------------------------ the architectures

def _image_feeds(n_cal, n_test, size, name="pixel_values", mean=0.5, std=0.25):
    cal, src = images(n_cal, 0, size, size)
    test, _ = images(n_test, n_cal, size, size)
    return {name: ((cal - mean) / std).astype(np.float32)}, {name: ((test - mean) / std).astype(np.float32)}, src


def _vision(make, size, outputs=("logits",), bn=True):
    def build(n_cal, n_test):
        cal, test, src = _image_feeds(n_cal, n_test, size)
        m, c, t = _torch_model(None, make, cal, test, list(outputs), bn)
        return m, c, t, src
    return build


def _text(make, vocab, token_types):
    def build(n_cal, n_test):
        cal, test = tokens(n_cal, 0, vocab, token_types), tokens(n_test, 1, vocab, token_types)
        m, c, t = _torch_model(None, make, cal, test, ["last_hidden_state"], bn=False)
        return m, c, t, "random token ids, padded attention masks"
    return build


def _audio(make, samples):
    def build(n_cal, n_test):
        cal, test = {"input_values": waveforms(n_cal, 0, samples)}, {"input_values": waveforms(n_test, 1, samples)}
        m, c, t = _torch_model(None, make, cal, test, ["last_hidden_state"], bn=False)
        return m, c, t, "deterministic waveforms (chirps, harmonics, noise)"
    return build


def _tf():
    import transformers

    return transformers


def resnet():
    t = _tf()
    return t.ResNetForImageClassification(t.ResNetConfig(
        embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1], layer_type="bottleneck",
        num_labels=100))


def convnext():
    t = _tf()
    return t.ConvNextForImageClassification(t.ConvNextConfig(
        hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1], num_labels=100))


def mobilenetv2():
    t = _tf()
    return t.MobileNetV2ForImageClassification(t.MobileNetV2Config(depth_multiplier=0.5, image_size=128,
                                                                    num_labels=100))


def efficientnet():
    t = _tf()
    return t.EfficientNetForImageClassification(t.EfficientNetConfig(
        width_coefficient=0.5, depth_coefficient=0.5, image_size=128, hidden_dim=640, num_labels=100))


def regnet():
    t = _tf()
    return t.RegNetForImageClassification(t.RegNetConfig(
        embedding_size=24, hidden_sizes=[24, 56, 152, 368], depths=[1, 1, 2, 1], groups_width=8,
        layer_type="y", num_labels=100))


def vit():
    t = _tf()
    return t.ViTForImageClassification(t.ViTConfig(
        image_size=128, patch_size=16, hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
        intermediate_size=768, num_labels=100))


def swin():
    t = _tf()
    return t.SwinForImageClassification(t.SwinConfig(
        image_size=128, patch_size=4, embed_dim=48, depths=[1, 1, 2, 1], num_heads=[2, 4, 8, 16], window_size=4,
        num_labels=100))


def bert():
    t = _tf()
    return t.BertModel(t.BertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                    intermediate_size=1024, max_position_embeddings=SEQ), add_pooling_layer=False)


def distilbert():
    t = _tf()
    return t.DistilBertModel(t.DistilBertConfig(vocab_size=8000, dim=256, n_layers=4, n_heads=4, hidden_dim=1024,
                                                max_position_embeddings=SEQ))


def wav2vec2():
    t = _tf()
    return t.Wav2Vec2Model(t.Wav2Vec2Config(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        conv_dim=(128,) * 7, num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=16,
        feat_extract_norm="group", do_stable_layer_norm=False, mask_time_prob=0.0))


def detr():
    t = _tf()
    backbone = t.ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                              layer_type="basic", out_features=["stage4"])
    return t.DetrForObjectDetection(t.DetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=128,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=512, decoder_ffn_dim=512, num_queries=25, num_labels=20))


def segformer():
    t = _tf()
    return t.SegformerForSemanticSegmentation(t.SegformerConfig(
        hidden_sizes=[32, 64, 160, 256], depths=[1, 1, 2, 1], num_attention_heads=[1, 2, 5, 8],
        decoder_hidden_size=128, num_labels=19))


ARCHS = [
    Spec("resnet", "cnn", "ResNet (bottleneck), 4 stages, 128 px", _vision(resnet, 128)),
    Spec("convnext", "cnn", "ConvNeXt, 4 stages, 128 px", _vision(convnext, 128)),
    Spec("mobilenetv2", "cnn", "MobileNetV2 x0.5, 128 px", _vision(mobilenetv2, 128)),
    Spec("efficientnet", "cnn", "EfficientNet-B0 x0.5 width/depth, 128 px", _vision(efficientnet, 128)),
    Spec("regnet", "cnn", "RegNetY, 4 stages, 128 px", _vision(regnet, 128)),
    Spec("vit", "vit", "ViT 4 layers, d 192, patch 16, 128 px", _vision(vit, 128, bn=False)),
    Spec("swin", "vit", "Swin 4 stages, d 48, window 4, 128 px", _vision(swin, 128, bn=False)),
    Spec("bert", "text", "BERT 4 layers, d 256, seq 128", _text(bert, 8000, True), dynamic=True),
    Spec("distilbert", "text", "DistilBERT 4 layers, d 256, seq 128", _text(distilbert, 8000, False), dynamic=True),
    Spec("wav2vec2", "audio", "Wav2Vec2 conv features + 4 layers, d 256, 1 s @ 16 kHz",
         _audio(wav2vec2, 16000), dynamic=True),
    Spec("detr", "detector", "DETR, transformers ResNet backbone, 2+2 layers, 128 px",
         _vision(detr, 128, outputs=("logits", "pred_boxes"))),
    Spec("segformer", "segmenter", "SegFormer (MiT) 4 stages, 128 px", _vision(segformer, 128)),
]


# ------------------------------------------------------------------------------------------ third-party ONNX

WHEELS = {"rapidocr-onnxruntime==1.4.4": "rapidocr_onnxruntime", "nudenet==3.4.2": "nudenet"}


def fetch_wheel_model(requirement: str, member: str) -> Path:
    """CACHE/<file>.onnx extracted from the wheel of `requirement` (`pip download --no-deps` when absent)."""
    out = CACHE / "models" / Path(member).name
    if out.is_file():
        return out
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name, version = requirement.split("==")
    norm = name.replace("-", "_")
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{norm}-{version}-".lower())]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), requirement],
                       check=True)
        found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{norm}-{version}-".lower())]
    with zipfile.ZipFile(found[0]) as z:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        tmp.write_bytes(z.read(member))
        tmp.replace(out)
    return out


def fix_dims(model: onnx.ModelProto, dims: dict[str, tuple]) -> onnx.ModelProto:
    """Fix an input's symbolic dims (None keeps axis 0 symbolic): what a user does before benchmarking
    a model whose H / W are dynamic (onnxruntime.tools.make_dynamic_shape_fixed does the same)."""
    for vi in model.graph.input:
        if vi.name in dims:
            for d, v in zip(vi.type.tensor_type.shape.dim, dims[vi.name]):
                if v is None:
                    d.dim_param = "batch"
                else:
                    d.dim_value = v
    return model


def _third_party(requirement, member, size_hw, mean, std, note):
    def build(n_cal, n_test):
        m = onnx.load(str(fetch_wheel_model(requirement, member)))
        inp = [i for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}][0]
        batch = inp.type.tensor_type.shape.dim[0]
        fixed_batch = batch.dim_value if batch.HasField("dim_value") and batch.dim_value > 0 else None
        m = fix_dims(m, {inp.name: (fixed_batch, 3, *size_hw)})
        cal, src = images(n_cal, 0, *size_hw)
        test, _ = images(n_test, n_cal, *size_hw)
        norm = lambda x: ((x - mean) / std).astype(np.float32)
        return m, {inp.name: norm(cal)}, {inp.name: norm(test)}, src
    return build


THIRD_PARTY = [
    Spec("ppocr_det", "third-party", "PP-OCRv4 text detector (DBNet), rapidocr-onnxruntime 1.4.4, 320 px",
         _third_party("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                      (320, 320), 0.5, 0.5, "")),
    Spec("ppocr_rec", "third-party", "PP-OCRv4 text recognizer (SVTR-LCNet), rapidocr-onnxruntime 1.4.4, 48x320",
         _third_party("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                      (48, 320), 0.5, 0.5, "")),
    Spec("ppocr_cls", "third-party", "PP-OCR mobile v2 direction classifier, rapidocr-onnxruntime 1.4.4, 48x192",
         _third_party("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                      (48, 192), 0.5, 0.5, "")),
    Spec("nudenet_yolov8n", "third-party", "YOLOv8n detector, nudenet 3.4.2, 320 px",
         _third_party("nudenet==3.4.2", "nudenet/320n.onnx", (320, 320), 0.0, 1.0, "")),
]

SPECS = {s.key: s for s in ARCHS + THIRD_PARTY}


def build(key: str, n_cal: int, n_test: int):
    """(fp32 model, calibration feeds, test feeds, data source, FP32 output stats) of zoo model `key`."""
    m, cal, test, src = SPECS[key].build(n_cal, n_test)
    return m, cal, test, src, _check_not_degenerate(m, test, key)
