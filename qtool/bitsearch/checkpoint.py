"""The search's workdir state: an append-only evaluation log and a per-generation state file.

`evaluations.jsonl`: one JSON object per finished evaluation, appended and fsync'd before the search
moves on, keyed by the candidate's configuration key. `--resume` rebuilds NSGA-III by replaying it
from the seed: pymoo's operators draw from `np.random.default_rng(seed)` only, so asking again with
the logged values served from the log gives the same populations, and only evaluations that never
finished are computed. No pickled algorithm object is read back (nothing but JSON is loaded).
A line cut short by a kill (the last one) is ignored; any other bad line is an error.

`config.json`: what the logged numbers depend on (model hash, space, evaluator settings, seed);
a resume with a different one is refused. `state.json`: generation, evaluations, the current
population (keys), for people and tools watching a run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from qtool.errors import QtoolError
from qtool.io import atomic_write_text

LOG = "evaluations.jsonl"
CONFIG = "config.json"
STATE = "state.json"


class EvaluationLog:
    def __init__(self, workdir: Path):
        self.path = Path(workdir) / LOG
        self.records: dict[str, dict] = {}
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        torn = False
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                if i == len(lines) - 1:  # a write cut short by a kill: that evaluation never finished
                    torn = True
                    break
                raise QtoolError(f"{self.path}: line {i + 1} is not JSON; the log is damaged") from None
            self.records[rec["key"]] = rec
        if data and not data.endswith(b"\n"):
            # Repair so the next append starts on a fresh line: drop a torn tail, or end a whole one.
            keep = data[:data.rfind(b"\n") + 1] if torn else data + b"\n"
            with open(self.path, "wb") as f:
                f.write(keep)
                f.flush()
                os.fsync(f.fileno())

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def append(self, rec: dict) -> None:
        line = json.dumps(rec, separators=(",", ":")) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records[rec["key"]] = rec

    def update(self, rec: dict) -> None:
        """A record gained metrics (e.g. a resumed search added an objective): append the full one
        again; loading keeps the last line per key."""
        self.append(rec)


def check_config(workdir: Path, config: dict, resume: bool) -> None:
    p = Path(workdir) / CONFIG
    has_log = (Path(workdir) / LOG).exists()
    if p.exists() or has_log:
        if not resume:
            raise QtoolError(f"{workdir} already holds a search; pass --resume to continue it or use a new --workdir")
        try:
            old = json.loads(p.read_text())
        except (OSError, ValueError):
            raise QtoolError(f"{p} is missing or damaged; cannot resume safely") from None
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            raise QtoolError(f"cannot resume {workdir}: settings differ ({', '.join(diff)}); use a new --workdir")
        return
    atomic_write_text(p, json.dumps(config, indent=2) + "\n")


def write_state(workdir: Path, state: dict) -> None:
    atomic_write_text(Path(workdir) / STATE, json.dumps(state, indent=2) + "\n")
