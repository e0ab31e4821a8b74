"""Where metrics go: always a `metrics.jsonl` in the run folder (one JSON object per line)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Protocol


class Tracker(Protocol):
    def log(self, step: int, metrics: Dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class JsonlTracker:
    """Appends {"step": .., "time": .., **metrics} lines to `path`, flushed after each line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self._t0 = time.time()

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        row = {"step": step, "time": round(time.time() - self._t0, 3)}
        for k, v in metrics.items():
            row[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
