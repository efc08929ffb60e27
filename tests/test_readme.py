"""The README is a user's guide that stays true: its Python API snippet runs as written, its headline table
is the one `python -m benchmarks results` generates, and it stays short."""
from __future__ import annotations

import os
import re
from pathlib import Path

from benchmarks import report

README = Path(__file__).resolve().parents[1] / "README.md"


def api_snippet(text: str) -> str:
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section holds exactly one python block"
    return blocks[0]


def test_the_python_api_snippet_runs_as_written(tmp_path, capsys):
    code = api_snippet(README.read_text())
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert (tmp_path / "lenet5.int8.onnx").is_file() and (tmp_path / "lenet5.plan.json").is_file()
    assert (tmp_path / "lenet5.w4a4.integer.onnx").is_file()
    accuracies = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("lenet5")]
    assert len(accuracies) == 3 and all(a > 0.5 for a in accuracies), out  # trained, and still trained once quantized


def test_the_headline_table_is_generated_from_the_results():
    assert report.update_readme() == README.read_text(), "rerun `python -m benchmarks results`"


def test_a_stale_headline_is_detected(tmp_path):
    stale = tmp_path / "README.md"
    stale.write_text(README.read_text().replace("| 1 | ", "| 1 | 9", 1))
    assert report.update_readme(stale) != stale.read_text()


def test_the_readme_stays_a_short_guide():
    assert len(README.read_bytes()) <= 8 * 1024
