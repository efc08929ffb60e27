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
