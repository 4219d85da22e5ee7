"""Writing benchmark results: one JSON (meta + rows) and one markdown table per run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def write_results(out: Path, meta: dict, rows: list, to_markdown: Callable[[dict, list], str]) -> None:
    """``out``.json and ``out``.md (``out`` is a path stem; parent folders are created)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(to_markdown(meta, rows))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
