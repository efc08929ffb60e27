"""python -m benchmarks run [--quick]: the benchmark suite (benchmarks/suite.py);
python -m benchmarks zoo [--quick]: the model zoo vs onnxruntime's tools (benchmarks/zoo.py);
python -m benchmarks nbits [--quick]: weight-only 4-bit MatMulNBits vs int8 and ORT's (benchmarks/nbits.py);
python -m benchmarks lowbit / accuracy_control [--quick]: low-bit PTQ vs AIMET, accuracy control vs NNCF;
python -m benchmarks smoothquant [--quick]: W8A8 of the small ViT with / without SmoothQuant vs ORT and NNCF;
python -m benchmarks qat_zoo [--quick]: QAT (distill) on the zoo (benchmarks/qat_zoo.py);
python -m benchmarks results: benchmarks/RESULTS.md from the JSON results (benchmarks/report.py)."""
import sys

USAGE = ("usage: python -m benchmarks run [--quick] [--models a,b]\n"
         "       python -m benchmarks zoo [--quick] [--models a,b] [--workdir DIR]\n"
         "       python -m benchmarks qat_zoo [--quick] [--models a,b] [--epochs E] [--batch B]\n"
         "       python -m benchmarks results [--tables] [-o FILE] [--results DIR]\n"
         "       python -m benchmarks lowbit [--quick] [--iters N]\n"
         "       python -m benchmarks nbits [--quick] [--models bert,vit] [--runs N]\n"
         "       python -m benchmarks accuracy_control [--quick]\n"
         "       python -m benchmarks smoothquant [--quick] [--alphas 0.25,0.5,0.75]")

cmd = sys.argv[1] if len(sys.argv) > 1 else None
if cmd == "run":
    from benchmarks import suite

    sys.exit(suite.main(sys.argv[2:]))
if cmd == "zoo":
    from benchmarks import zoo

    sys.exit(zoo.main(sys.argv[2:]))
if cmd == "qat_zoo":
    from benchmarks import qat_zoo

    sys.exit(qat_zoo.main(sys.argv[2:]))
if cmd == "lowbit":
    from benchmarks import lowbit

    sys.exit(lowbit.main(sys.argv[2:]))
if cmd == "nbits":
    from benchmarks import nbits

    sys.exit(nbits.main(sys.argv[2:]))
if cmd == "accuracy_control":
    from benchmarks import accuracy_control

    sys.exit(accuracy_control.main(sys.argv[2:]))
if cmd == "smoothquant":
    from benchmarks import smoothquant

    sys.exit(smoothquant.main(sys.argv[2:]))
if cmd == "results":
    from benchmarks import report

    sys.exit(report.main(sys.argv[2:]))
print(USAGE, file=sys.stderr)
sys.exit(2)
