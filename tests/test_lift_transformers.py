"""transformers architectures (tiny configs, random weights) exported by torch.onnx.export (opset 17):
the raw export and qtool's fused graph both lift, and the lifted FP32 module matches onnxruntime.

Tolerance: max |lift - ort| <= 1e-5 * max |ort| per output (float32 arithmetic in a different
order: sums of ~100 products differ by a few ulps of the largest value).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

transformers = pytest.importorskip("transformers")

from qtool.fusion import fuse  # noqa: E402
from qtool.lift import lift  # noqa: E402

REL = 1e-5


def _images(b=2, hw=32):
    return (torch.randn(b, 3, hw, hw),), ["pixel_values"]


def _text():
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # padded second sequence: the mask path (Cast/Sub/Mul/Where) is live
    return (ids, mask), ["input_ids", "attention_mask"]


def _build(name: str):
    T = transformers
    if name == "vit":
        return T.ViTForImageClassification(T.ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8, num_labels=5)), *_images()
    if name == "swin":
        return T.SwinForImageClassification(T.SwinConfig(
            image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
            num_labels=5)), *_images()
    if name == "convnext":
        return T.ConvNextForImageClassification(T.ConvNextConfig(
            num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5, image_size=32)), *_images()
    if name == "mobilevit":
        return T.MobileViTForImageClassification(T.MobileViTConfig(
            image_size=32, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
            num_labels=5)), *_images()
    if name == "bert":
        return T.BertForSequenceClassification(T.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=16, num_labels=3)), *_text()
    if name == "distilbert":
        return T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=16,
            num_labels=3)), *_text()
    if name == "wav2vec2":
        return T.Wav2Vec2ForSequenceClassification(T.Wav2Vec2Config(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
            conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
            num_labels=3)), (torch.randn(2, 400),), ["input_values"]
    if name == "segformer":
        return T.SegformerForSemanticSegmentation(T.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
            decoder_hidden_size=32, num_labels=4, patch_sizes=[7, 3], strides=[4, 2])), *_images()
    if name == "detr":
        backbone = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                  out_features=["stage4"])
        return T.DetrForObjectDetection(T.DetrConfig(
            use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=32,
            encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_labels=5)), \
            (torch.randn(1, 3, 64, 64),), ["pixel_values"]
    if name == "mobilenetv2":
        return T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
            image_size=32, depth_multiplier=0.35, num_labels=5)), *_images()
    if name == "efficientnet":
        return T.EfficientNetForImageClassification(T.EfficientNetConfig(
            image_size=32, width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=320, num_labels=5)), *_images()
    raise KeyError(name)


def _randomize(m: torch.nn.Module, seed: int = 0) -> None:
    """Trained-like random weights: transformers' fresh init zeroes heads and leaves BN at identity, and
    torch then dedups the equal initializers; outputs of 0 would make the comparison empty."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            for pname, p in mod.named_parameters(recurse=False):
                if p.dim() >= 2:
                    p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
                elif "weight" in pname or "scale" in pname:
                    p.uniform_(0.5, 1.5, generator=g)
                else:
                    p.uniform_(-0.2, 0.2, generator=g)
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.2, 0.2, generator=g)
                mod.running_var.uniform_(0.5, 2.0, generator=g)


class _Outputs(torch.nn.Module):
    """The tensors of a transformers output (logits; DETR also its boxes), positional inputs."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, *args):
        out = self.m(*args, return_dict=True)
        return (out.logits, out.pred_boxes) if hasattr(out, "pred_boxes") else out.logits


_CACHE: dict[str, tuple] = {}


def exported(name: str, dynamic_batch: bool = False):
    """(onnx model, feeds) of the tiny `name`, exported once per test session (batch 2, or dynamic)."""
    key = (name, dynamic_batch)
    if key not in _CACHE:
        torch.manual_seed(0)
        m, args, names = _build(name)
        _randomize(m.eval())
        f = io.BytesIO()
        axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Outputs(m), args, f, dynamo=False, opset_version=17, input_names=names,
                              dynamic_axes=axes)
        _CACHE[key] = (onnx.load_from_string(f.getvalue()), {n: a.numpy() for n, a in zip(names, args)})
    return _CACHE[key]


def _ort(model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _assert_lift_matches_ort(model, feeds):
    refs = _ort(model, feeds)
    with torch.no_grad():
        out = lift(model).eval()(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    out = out if isinstance(out, tuple) else (out,)
    assert len(out) == len(refs)
    for y, ref in zip(out, refs):
        assert tuple(y.shape) == ref.shape
        scale = float(np.abs(ref).max())
        assert ref.std() > 1e-3 * scale > 0  # not a degenerate (constant) output
        err = float(np.abs(y.numpy() - ref).max())
        assert err <= REL * scale, f"max |lift - ort| = {err:.3g} on outputs up to {scale:.3g}"


# Op types each family must bring along (so a change in the exporter cannot hollow the test out).
FAMILIES = {
    "vit": {"LayerNormalization", "Erf", "Softmax", "Where", "Expand"},
    "swin": {"LayerNormalization", "Mod", "Pad", "Softmax"},
    "convnext": {"LayerNormalization", "ReduceMean", "Erf"},
    "mobilevit": {"LayerNormalization", "Resize", "Ceil", "Sigmoid"},
    "bert": {"LayerNormalization", "GatherElements", "GreaterOrEqual", "And", "IsNaN", "Where", "Tanh"},
    "distilbert": {"LayerNormalization", "Gather", "Where", "IsNaN"},
    "wav2vec2": {"InstanceNormalization", "LayerNormalization", "Erf"},
    "segformer": {"LayerNormalization", "Resize"},
    "detr": {"LayerNormalization", "CumSum", "Sin", "Cos", "Tile", "Resize", "MaxPool"},
    "mobilenetv2": {"Clip", "Pad", "ConstantOfShape"},
    "efficientnet": {"Sigmoid", "GlobalAveragePool", "Pad"},
}
SLOW = {"mobilevit", "mobilenetv2"}  # ~1000-node exports


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in FAMILIES])
def test_raw_and_fused_exports_lift_and_match_ort(name, one_thread):
    model, feeds = exported(name)
    ops = {n.op_type for n in model.graph.node}
    assert FAMILIES[name] <= ops, FAMILIES[name] - ops
    _assert_lift_matches_ort(model, feeds)
    fused, _ = fuse(model)
    _assert_lift_matches_ort(fused, feeds)


def test_text_model_takes_ids_and_mask_positionally_or_by_name_and_trains(one_thread):
    model, feeds = exported("bert")
    lifted = lift(model)
    assert lifted.input_names == ["input_ids", "attention_mask"]
    ids, mask = (torch.from_numpy(feeds[n]) for n in lifted.input_names)
    lifted.eval()
    with torch.no_grad():
        by_name = lifted(attention_mask=mask, input_ids=ids)
        positional = lifted(ids, mask)
        mixed = lifted(ids, attention_mask=mask)
        unmasked = lifted(ids, torch.ones_like(mask))
    assert torch.equal(by_name, positional) and torch.equal(by_name, mixed)
    assert not torch.allclose(by_name[1], unmasked[1])  # the mask changes the padded sequence only
    assert torch.allclose(by_name[0], unmasked[0], atol=1e-6)
    lifted.train()
    torch.nn.functional.cross_entropy(lifted(ids, mask), torch.tensor([0, 2])).backward()
    params = lifted.trainable_initializers()
    emb = [n for n in params if "word_embeddings" in n]
    norms = [n for n in params if "LayerNorm" in n]
    assert emb and norms
    dead = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


def test_gradient_reaches_float_input_and_weights(one_thread):
    model, feeds = exported("wav2vec2")
    lifted = lift(model).train()
    x = torch.from_numpy(feeds["input_values"]).requires_grad_()
    lifted(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    grads = [p.grad for p in lifted.trainable_initializers().values()]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize("name", ["vit", "bert", "efficientnet"])
def test_qat_fake_quant_equals_onnxruntime_on_attention(name, one_thread):
    """W8A8 QAT (distillation, no labels) of a transformer: the eval-mode fake-quant model computes what
    onnxruntime's QLinearSoftmax / QLinearMatMul / QGemm (and EfficientNet's QLinearMul / QLinearSigmoid)
    compute, so the outputs are 0 steps apart and the fidelity gate passes without --accept-fidelity.
    Before qtool.ortexact emulated them the zoo ViT was 19-51 steps off and BERT 2.3."""
    from qtool.feeds import FeedSet
    from qtool.ortexact import ExactLookup, ExactMatMul, ExactMul, ExactSoftmax
    from qtool.qat_config import QATConfig
    from qtool.qat_train import qat

    model, _ = exported(name, dynamic_batch=True)
    rng = np.random.default_rng(0)
    n = 40
    if name == "bert":
        arrays = {"input_ids": rng.integers(0, 100, (n, 8)).astype(np.int64),
                  "attention_mask": np.ones((n, 8), np.int64)}
        arrays["attention_mask"][::2, 5:] = 0
    else:
        arrays = {"pixel_values": rng.normal(size=(n, 3, 32, 32)).astype(np.float32)}
    fs = FeedSet(arrays)
    r = qat(model, fs.split("train"), fs.split("val"),
            QATConfig(loss="distill", steps=3, batch_size=8, calib_size=32, optimizer="adam", lr=1e-4, quiet=True))
    assert r.fidelity["gate"] == "passed"
    assert all(o["max_steps"] == 0 for o in r.fidelity["outputs"].values()), r.fidelity
    kinds = {type(m) for m in r.module.eval_overrides.values()}
    # BERT's Softmax reads the attention mask's large negative values: PTQ keeps it float
    expected = {"vit": {ExactMatMul, ExactSoftmax}, "bert": {ExactMatMul}, "efficientnet": {ExactMul, ExactLookup}}
    assert expected[name] <= kinds, kinds
