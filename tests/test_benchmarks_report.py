"""benchmarks/RESULTS.md and the results/NAME.md tables are generated from the committed benchmark JSONs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report

REPO = Path(__file__).resolve().parents[1]
KEPT = [(s, name) for s in report.SECTIONS for name, _ in s.runs]


def probe(kind: str, d: dict) -> str:
    """One number of the JSON, formatted as its benchmark's table shows it."""
    if kind == "suite":
        return f"{d['models']['resnet20']['latency']['batch1']['qtool_int8']['median_ms']:.3f}"
    if kind == "train":
        return f"{d['val_acc_onnx'] * 100:.2f}"
    if kind == "qat":
        r = next(v for v in d.values() if isinstance(v, dict) and "fp32_acc" in v)
        return f"{next(v for k, v in r.items() if k.startswith('qat_'))['acc_ort'] * 100:.2f}"
    if kind == "export":
        return str(d["w4a8_int4_weights"]["int4_packed_bytes"])
    if kind == "search":
        return f"{d['hypervolume']['random']:.3f}"
    if kind == "calibration":
        return f"{d['methods']['entropy']['qtool']['top1'] * 100:.2f}"
    if kind == "dynamic":
        return f"{d['dynamic']['acc_ort'] * 100:.2f}"
    if kind == "zoo":
        return f"{d['summary']['latency_geomean_qtool_over_ort']:.3f}"
    if kind == "qat_zoo":
        r = next(r for m in d["models"].values() for r in m.get("bits", {}).values() if "before" in r)
        return f"{r['before']['min_sqnr_db']:.2f}"
    if kind == "lowbit":
        return f"{d['bits']['W4A8']['qtool adaround']['top1'] * 100:.2f}"
    if kind == "nbits":
        return f"{d['models']['bert']['variants']['qtool_gptq']['sqnr']['min_sqnr_db']:.2f}"
    if kind == "accuracy_control":
        return f"{d['rows']['qtool --bits w4a8 --max-drop 0.5']['top1']['held_out'] * 100:.2f}"
    if kind == "smoothquant":
        return f"{d['rows']['qtool W8A8 --smoothquant 0.5']['sqnr_db']:.2f}"
    raise AssertionError(kind)


def section(text: str, title: str) -> str:
    assert f"\n## {title}\n" in text, title
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_every_listed_benchmark_has_its_committed_json():
    assert {s.kind for s in report.SECTIONS} == set(report.RENDER)
    missing = [name for _, name in KEPT if not (report.RESULTS / f"{name}.json").exists()]
    assert not missing


def test_results_md_is_generated_with_each_benchmarks_section_and_numbers(tmp_path):
    out = tmp_path / "RESULTS.md"
    assert report.main(["-o", str(out)]) == 0
    text = out.read_text()
    for s, name in KEPT:
        part = section(text, s.title)
        assert f"### `results/{name}.json`" in part
        sub = part.split(f"### `results/{name}.json`", 1)[1].split("\n### ", 1)[0]
        assert probe(s.kind, report.load(name)) in sub, (name, probe(s.kind, report.load(name)))
    assert not (tmp_path / "results").exists()  # -o alone writes nothing else


def test_a_changed_json_changes_the_page(tmp_path):
    res = tmp_path / "results"
    shutil.copytree(report.RESULTS, res, ignore=lambda d, names: [n for n in names if not n.endswith(".json")])
    d = report.load("qat", res)
    d["resnet20_cifar10"]["qat_w4a4_pact"]["acc_ort"] = 0.1234
    (res / "qat.json").write_text(json.dumps(d))
    (res / "dynamic_quick.json").unlink()
    text = report.results_markdown(res)
    sub = section(text, "QAT: fidelity to onnxruntime and accuracy").split("### `results/qat_fidelity.json`")[0]
    assert "| w4a4_pact | 83.86 | 12.34 |" in sub
    assert "`results/dynamic_quick.json` is absent" in text
    assert report.main(["--results", str(res), "--tables", "-o", str(tmp_path / "R.md")]) == 0
    assert "| w4a4_pact | 83.86 | 12.34 |" in (res / "qat.md").read_text()


def test_committed_pages_are_up_to_date():
    """RESULTS.md and every results/NAME.md equal what the JSONs generate (rerun `python -m benchmarks
    results --tables` after a benchmark)."""
    assert report.RESULTS_MD.read_text() == report.results_markdown()
    for s, name in KEPT:
        assert (report.RESULTS / f"{name}.md").read_text() == report.RENDER[s.kind](report.load(name)), name


def test_cli_entry_point(tmp_path):
    run = [sys.executable, "-m", "benchmarks"]
    r = subprocess.run(run + ["results", "-o", str(tmp_path / "R.md")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "R.md").read_text() == report.results_markdown()
    r = subprocess.run(run + ["results", "--results", str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "no such folder" in r.stderr
    r = subprocess.run(run + ["bogus"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


@pytest.mark.parametrize("kind", sorted(report.RENDER))
def test_each_table_shows_a_number_of_its_json(kind):
    name = next(n for s, n in KEPT if s.kind == kind)
    d = report.load(name)
    assert probe(kind, d) in report.RENDER[kind](d)


def testkept_gains_are_shares_of_the_uniform_gains_over_fp32():
    row = lambda ms, size, **kw: {"latency_ms": ms, "size_bytes": size, **kw}  # noqa: E731
    d = {"fp32": {"latency_ms": 2.0, "size_bytes": 1000},
         "rows": {"qtool W8A8 (uniform)": row(1.0, 300), "qtool W4A8 (uniform)": row(1.0, 300, int4_packed_bytes=200),
                  "qtool --max-drop": row(1.2, 300, int4_packed_bytes=400), "peer": row(2.5, 300)}}
    got = dict(report.kept_gains(d))
    assert got == {"qtool --max-drop": "80% of the latency gain, 75% of the size gain",
                   "peer": "none of the latency gain (slower than FP32), 88% of the size gain"}
    d["rows"]["qtool W8A8 (uniform)"]["latency_ms"] = 2.2  # INT8 slower than FP32: no latency gain to share
    assert dict(report.kept_gains(d))["peer"].startswith("no latency gain to keep")
