"""Instance-aware dynamic bit-widths (DQNet): a bit controller picks per-sample, per-layer bits; deployed on
onnxruntime as controller.onnx + one QDQ model per configuration, routed by `DynamicSession`.

    from qtool.dynbits import DynamicConfig, dynamic, DynamicSession
    result = dynamic(model, train_ds, val_ds, DynamicConfig(bits=(3, 4, 5), target="u4"), "dyn-out")
    sess = DynamicSession.load("dyn-out"); logits = sess.run(x)
"""
from qtool.dynbits.controller import Controller, DynamicNet
from qtool.dynbits.runtime import DynamicSession, controller_model, latency, write_deployment
from qtool.dynbits.train import DynamicConfig, DynamicResult, dynamic, parse_target

__all__ = ["Controller", "DynamicConfig", "DynamicNet", "DynamicResult", "DynamicSession", "controller_model",
           "dynamic", "latency", "parse_target", "write_deployment"]
