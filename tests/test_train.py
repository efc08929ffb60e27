import collections

import numpy as np
import onnx
import pytest
import torch

from qtool.errors import QtoolError
from qtool.evaluation import evaluate_model
from qtool.preprocess import read_preprocess
from qtool.training import TrainConfig, load_checkpoint, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "lenet.onnx"
    r = train(TrainConfig(model="lenet5", data="digits", epochs=2, batch_size=64, lr=0.05), out, quiet=True)
    return r, out


def test_training_learns_and_export_matches_torch(trained):
    r, out = trained
    assert r.val_acc_torch > 0.8  # 2 epochs of LeNet on digits is well above chance (0.1)
    assert abs(r.val_acc_torch - r.val_acc_onnx) <= 0.0005
    m = onnx.load(out)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert ops["BatchNormalization"] == 2 and ops["Conv"] == 2  # BN kept for `qtool fuse`
    pre = read_preprocess(m)
    assert pre is not None and pre.mean == (0.2,)
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_checkpoint_round_trip_matches_onnx(trained):
    r, out = trained
    model = load_checkpoint(r.checkpoint, in_channels=1).eval()
    from qtool.data import load_dataset

    ds = load_dataset("digits", "val")
    x = read_preprocess(onnx.load(out)).apply(ds.images[:16])
    from qtool.evaluation import predict

    np.testing.assert_allclose(model(torch.from_numpy(x)).detach().numpy(), predict(onnx.load(out), x), atol=1e-4)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoint_with_code_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"model": "lenet5", "state_dict": {}, "x": _Evil()}, p)
    with pytest.raises(QtoolError, match="cannot load checkpoint"):
        load_checkpoint(p)


def test_bad_config():
    with pytest.raises(QtoolError, match="epochs"):
        TrainConfig(epochs=0)


def test_eval_on_fixed_batch_model_pads_last_batch(trained, tmp_path):
    _, out = trained
    m = onnx.load(out)
    full = evaluate_model(m, "digits").accuracy
    for t in (m.graph.input[0], m.graph.output[0]):
        t.type.tensor_type.shape.dim[0].dim_value = 7
    assert evaluate_model(m, "digits").accuracy == pytest.approx(full)


def _stop_in_epoch_2(monkeypatch, cfg, out):
    """Run `cfg` into `out` and stop it (as Ctrl-C would) when epoch 2 is scored, after epoch 1's state is saved."""
    import qtool.training as training

    real, calls = training.evaluate_torch, []

    def stop(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(training, "evaluate_torch", stop)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, out, quiet=True)


def test_stopped_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """A run stopped after epoch 1 and started again ends where an unbroken run ends."""
    cfg = TrainConfig(model="lenet5", data="digits", epochs=2, batch_size=64, lr=0.05, optimizer="adamw",
                      label_smoothing=0.1, warmup=0.3)
    whole = train(cfg, tmp_path / "whole.onnx", quiet=True)
    _stop_in_epoch_2(monkeypatch, cfg, tmp_path / "split.onnx")
    assert (tmp_path / "split.resume.pt").exists() and not (tmp_path / "split.onnx").exists()
    split = train(cfg, tmp_path / "split.onnx", quiet=True)
    assert [h["epoch"] for h in split.history] == [1, 2]
    assert split.history[0]["loss"] == whole.history[0]["loss"]
    a, b = load_checkpoint(whole.checkpoint, in_channels=1), load_checkpoint(split.checkpoint, in_channels=1)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not (tmp_path / "split.resume.pt").exists()  # removed once the run is complete


def test_resume_state_of_another_config_is_not_used(tmp_path, monkeypatch):
    first = TrainConfig(model="lenet5", data="digits", epochs=2, batch_size=64, lr=0.05)
    other = TrainConfig(model="lenet5", data="digits", epochs=2, batch_size=64, lr=0.02)
    _stop_in_epoch_2(monkeypatch, first, tmp_path / "m.onnx")
    resumed = train(other, tmp_path / "m.onnx", quiet=True)
    fresh = train(other, tmp_path / "fresh.onnx", quiet=True)
    assert resumed.history == [dict(h, elapsed_s=r["elapsed_s"]) for h, r in zip(fresh.history, resumed.history)]


def test_vit_cifar_exports_transformer_ops(tmp_path):
    from qtool.models import build_model
    from qtool.preprocess import Preprocess
    from qtool.training import export_onnx

    m = build_model("vit_cifar")
    onnx_model = export_onnx(m, (3, 32, 32), Preprocess(mean=(0.5,) * 3, std=(0.25,) * 3))
    ops = collections.Counter(n.op_type for n in onnx_model.graph.node)
    assert ops["LayerNormalization"] == 9 and ops["Softmax"] == 4 and ops["Conv"] == 2
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    from qtool.evaluation import predict

    np.testing.assert_allclose(m.eval()(torch.from_numpy(x)).detach().numpy(), predict(onnx_model, x), atol=1e-4)
