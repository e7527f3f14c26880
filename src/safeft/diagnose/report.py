"""``safeft diagnose``: drift of every checkpoint, localisation, pictures, tables, one printed verdict per run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safeft import io
from safeft.diagnose.drift import DriftConfig, diagnose_run
from safeft.diagnose.localise import Thresholds, localise
from safeft.diagnose.plots import plot_heatmaps, plot_overview, write_csvs


def diagnose(
    run: Path,
    compare: Path | None = None,
    out: Path | None = None,
    dc: DriftConfig = DriftConfig(),
    th: Thresholds = Thresholds(),
    progress: bool = True,
) -> dict[str, Any]:
    """Diagnose ``run`` (and ``compare``, side by side); write everything under ``out`` (default
    ``<run>/diagnose``): drift.json, summary.json, CSVs, overview.png, heatmaps.png."""
    run = Path(run)
    out = Path(out) if out else run / "diagnose"
    runs = [run] + ([Path(compare)] if compare else [])
    records = [diagnose_run(r, dc, progress) for r in runs]
    summaries = [localise(rec, th) for rec in records]
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for k, (rec, summ) in enumerate(zip(records, summaries, strict=True)):
        sub = out if k == 0 else out / f"compare-{rec['name']}"
        sub.mkdir(parents=True, exist_ok=True)
        io.write_json(sub / "drift.json", rec, indent=1)
        files += write_csvs(rec, sub)
        files.append(plot_heatmaps(rec, sub / "heatmaps.png"))
        if k > 0:
            io.write_json(sub / "summary.json", summ)
    files.append(plot_overview(records, summaries, out / "overview.png", th.sample))
    result = {**summaries[0], "compare": summaries[1] if compare else None, "files": [str(f) for f in files]}
    io.write_json(out / "summary.json", result)
    return result
