"""qtool: ONNX-centric quantization toolchain."""

__version__ = "0.1.0"
