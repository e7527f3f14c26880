"""Pictures and tables of a diagnosis: PNGs for people, CSVs with the same numbers for re-plotting.

* ``overview.png``: one row per run (two with ``--compare``, on shared colour scales): heatmaps of 1 − CKA
  (layer x step) on the harmful and the benign probes, ASR and KL(ref ‖ model) vs step, and per-layer
  drift at the final checkpoint.
* ``heatmaps.png``: 1 − CKA for every probe set x sample definition of one run.
* CSVs: ``cka_<probe>_<sample>.csv`` (step x layer CKA) and ``curves.csv`` (step, ASR, KLs, mean CKAs).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from safeft.diagnose.drift import PROBES, SAMPLES
from safeft.diagnose.localise import SAMPLE_NAMES, drift_matrix


def write_csvs(record: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    n = record["layers"]
    for p in PROBES:
        for s in SAMPLES:
            path = out / f"cka_{p}_{s}.csv"
            with path.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["step", *[f"layer{i}" for i in range(n)]])
                for st in record["steps"]:
                    w.writerow([st["step"], *[f"{c:.6f}" for c in st["probes"][p]["cka"][s]]])
            written.append(path)
    path = out / "curves.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        mean_cols = [f"mean_cka_{p}_{s}" for p in PROBES for s in SAMPLES]
        w.writerow(["step", "asr", "asr_n", "asr_ci_low", "asr_ci_high", "kl_harmful", "kl_benign", *mean_cols])
        for st in record["steps"]:
            means = [sum(st["probes"][p]["cka"][s]) / n for p in PROBES for s in SAMPLES]
            asr = "" if st.get("asr") is None else f"{st['asr']:.4f}"
            ci = [f"{x:.4f}" for x in st["asr_ci"]] if st.get("asr_ci") else ["", ""]
            w.writerow(
                [
                    st["step"],
                    asr,
                    st.get("asr_n") or "",
                    *ci,
                    f"{st['probes']['harmful']['kl']:.6f}",
                    f"{st['probes']['benign']['kl']:.6f}",
                    *[f"{m:.6f}" for m in means],
                ]
            )
    written.append(path)
    return written


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _heatmap(ax, record, probe, sample, vmax, title):
    import numpy as np

    d = np.array(drift_matrix(record, probe, sample)).T  # layers x steps
    steps = [st["step"] for st in record["steps"]]
    im = ax.imshow(d, aspect="auto", origin="lower", cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("layer (0-based block)")
    ax.yaxis.set_major_locator(_int_ticks())
    ax.set_title(title, fontsize=9)
    return im


def _int_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _vmax(records, probes, sample) -> float:
    m = max(max(max(row) for row in drift_matrix(r, p, sample)) for r in records for p in probes)
    return max(m, 1e-6)


def plot_overview(records: list[dict[str, Any]], summaries: list[dict[str, Any]], out: Path, sample: str = "mean"):
    """One row per run; colour scales and y-axes shared across runs so a comparison reads honestly."""
    plt = _plt()
    rows = len(records)
    fig, axes = plt.subplots(rows, 4, figsize=(19, 4.2 * rows), squeeze=False)
    # one colour scale per probe set, shared by the runs: harmful drift is often several times smaller than
    # benign (task) drift, and a common scale would paint it black
    vmax = {p: _vmax(records, [p], sample) for p in PROBES}
    kl_max = max(st["probes"][p]["kl"] for r in records for st in r["steps"] for p in PROBES) * 1.1 + 1e-9
    bar_max = max(vmax.values()) * 1.1
    for row, (rec, summ) in enumerate(zip(records, summaries, strict=True)):
        name = rec["name"]
        for col, p in enumerate(PROBES):
            im = _heatmap(
                axes[row][col], rec, p, sample, vmax[p], f"{name}: 1 − CKA, {p} probes ({SAMPLE_NAMES[sample]})"
            )
            fig.colorbar(im, ax=axes[row][col], fraction=0.046)
        ax = axes[row][2]
        steps = [st["step"] for st in rec["steps"]]
        kl = [st["probes"]["harmful"]["kl"] for st in rec["steps"]]
        ax.plot(steps, kl, "o-", color="tab:red", label="KL(ref‖model), harmful")
        ax.plot(
            steps, [st["probes"]["benign"]["kl"] for st in rec["steps"]], "s--", color="tab:orange", label="KL, benign"
        )
        ax.set_ylim(0, kl_max)
        ax.set_xlabel("step")
        ax.set_ylabel("next-token KL (nats)")
        asr = [(s, st["asr"]) for s, st in zip(steps, rec["steps"], strict=True) if st.get("asr") is not None]
        ax2 = ax.twinx()
        if asr:
            ax2.plot([a[0] for a in asr], [a[1] for a in asr], "D-", color="tab:blue", label="ASR")
            band = [(s, st["asr_ci"]) for s, st in zip(steps, rec["steps"], strict=True) if st.get("asr_ci")]
            if band:  # the 95 % Wilson interval: with 20 prompts per checkpoint it is wide, and should look it
                ax2.fill_between(
                    [b[0] for b in band], [b[1][0] for b in band], [b[1][1] for b in band], color="tab:blue", alpha=0.15
                )
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel("ASR")
        if summ.get("onset_step") is not None:
            ax.axvline(summ["onset_step"], color="gray", ls=":", lw=1)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center right")
        ax.set_title(f"{name}: ASR and KL vs step", fontsize=9)
        ax = axes[row][3]
        n = rec["layers"]
        # bars at the step the localisation ranks layers by (the onset, else the final checkpoint)
        at_step = summ.get("drift_rise_step", rec["steps"][-1]["step"])
        final = next(st for st in rec["steps"] if st["step"] == at_step)["probes"]
        width = 0.4
        for k, p in enumerate(PROBES):
            vals = [1 - c for c in final[p]["cka"][sample]]
            ax.bar([i + (k - 0.5) * width for i in range(n)], vals, width, label=f"{p} probes")
        for i in summ.get("concentrated_layers", []):
            ax.axvspan(i - 0.5, i + 0.5, color="gold", alpha=0.25, lw=0)
        ax.set_ylim(0, bar_max)
        ax.set_xlabel("layer (0-based block); shaded: concentrated")
        ax.xaxis.set_major_locator(_int_ticks())
        ax.set_ylabel(f"1 − CKA at step {at_step}")
        ax.legend(fontsize=7)
        ax.set_title(
            f"{name}: per-layer drift at step {at_step} ({'onset' if summ.get('onset_step') else 'final'})", fontsize=9
        )
    fig.suptitle("\n".join(s["verdict"] for s in summaries), fontsize=8, y=1.0)
    fig.tight_layout()
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_heatmaps(record: dict[str, Any], out: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(len(PROBES), len(SAMPLES), figsize=(5 * len(SAMPLES), 3.8 * len(PROBES)), squeeze=False)
    for j, s in enumerate(SAMPLES):
        for i, p in enumerate(PROBES):
            im = _heatmap(axes[i][j], record, p, s, _vmax([record], [p], s), f"1 − CKA, {p} probes, {SAMPLE_NAMES[s]}")
            fig.colorbar(im, ax=axes[i][j], fraction=0.046)
    fig.suptitle(f"{record['name']}: drift from the aligned reference, every sample definition", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return out
