"""python -m benchmarks run [--quick]: the benchmark suite (see benchmarks/suite.py)."""
import sys

from benchmarks import suite

if len(sys.argv) < 2 or sys.argv[1] != "run":
    print("usage: python -m benchmarks run [--quick] [--models a,b]", file=sys.stderr)
    sys.exit(2)
sys.exit(suite.main(sys.argv[2:]))
