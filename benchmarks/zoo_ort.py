"""The onnxruntime side of benchmarks.zoo, in its own process (timed like `qtool quantize`, and a crash
or hang of onnxruntime's tool is recorded instead of ending the benchmark):

    python -m benchmarks.zoo_ort static IN.onnx OUT.onnx CALIB.npz [--pre]   # quantize_static, QDQ, its defaults
    python -m benchmarks.zoo_ort dynamic IN.onnx OUT.onnx [--pre]            # quantize_dynamic, its defaults

--pre runs onnxruntime's recommended quant_pre_process (symbolic shape inference + ORT graph optimization)
first. The calibration reader feeds the npz (one array per input name) in batches of 64, as qtool does.
Exit 0 on success; otherwise exit 1 with the first line of the error on stderr.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

CALIB_BATCH = 64  # qtool.feeds.calibration_feeds' default


def main(argv: list[str]) -> int:
    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    mode, src, dst, *rest = argv
    pre = "--pre" in rest
    rest = [str(Path(a).resolve()) for a in rest if a != "--pre"]
    src, dst = str(Path(src).resolve()), str(Path(dst).resolve())
    here = os.getcwd()
    try:
        with tempfile.TemporaryDirectory() as d:
            os.chdir(d)  # quant_pre_process leaves sym_shape_infer_temp.onnx and *.data files in the cwd
            if pre:
                p = str(Path(d) / "pre.onnx")
                try:
                    quant_pre_process(src, p, skip_symbolic_shape=False)
                except Exception as e:
                    raise RuntimeError(f"quant_pre_process: {_line(e)}") from None
                src = p
            if mode == "static":
                z = np.load(rest[0])
                arrays = {k: z[k] for k in z.files if k != "labels"}
                n = len(next(iter(arrays.values())))

                class Reader(CalibrationDataReader):
                    def __init__(self):
                        self.i = 0

                    def get_next(self):
                        if self.i >= n:
                            return None
                        b = {k: v[self.i:self.i + CALIB_BATCH] for k, v in arrays.items()}
                        self.i += CALIB_BATCH
                        return b

                quantize_static(src, dst, Reader())
            elif mode == "dynamic":
                quantize_dynamic(src, dst)
            else:
                raise ValueError(f"unknown mode {mode!r}")
    except Exception as e:
        print(f"{type(e).__name__}: {_line(e)}", file=sys.stderr)
        return 1
    finally:
        os.chdir(here)
    return 0


def _line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
