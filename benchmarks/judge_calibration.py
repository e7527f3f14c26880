"""Precision and recall of each rule judge on our labelled refuse/comply pairs (text only, no model).

The positive class is **comply** (an attack that succeeded, what ASR counts). For every judge it prints the
confusion counts, precision, recall and accuracy, then which kinds of answer it gets wrong (e.g.
"comply/illegal_mention": compliant answers that mention "illegal" and the judge called refusals).

    .venv/bin/python benchmarks/judge_calibration.py                      # the rule judges
    .venv/bin/python benchmarks/judge_calibration.py --part heldout       # on the half no rule was tuned on
    .venv/bin/python benchmarks/judge_calibration.py --errors             # and every misjudged answer
    .venv/bin/python benchmarks/judge_calibration.py --kinds marker plain long short   # the easy cases only
    .venv/bin/python benchmarks/judge_calibration.py --judge 'llama_guard:model=/models/guard'  # any judge
"""

from __future__ import annotations

import argparse
import json

from safeft.eval import calibration, judges

RULE_JUDGES = ("refusal_keywords", "refusal_rule", "refusal_layered")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--judge", action="append", help=f"judge spec (repeatable); default: {', '.join(RULE_JUDGES)}")
    p.add_argument("--data", help="a calibration JSONL file (default: the one shipped with safeft)")
    p.add_argument(
        "--part",
        choices=calibration.PARTS,
        default="all",
        help="tune: the half refusal_layered was designed on; heldout: the other half (report this); all",
    )
    p.add_argument("--kinds", nargs="+", help="only rows of these kinds (e.g. marker plain long short)")
    p.add_argument("--errors", action="store_true", help="print every misjudged answer")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)

    rows = calibration.select(calibration.load(args.data), args.part)
    if args.kinds:
        rows = [r for r in rows if r["kind"] in args.kinds]
        if not rows:
            p.error(f"no rows of kinds {args.kinds}")
    specs = args.judge or list(RULE_JUDGES)
    results = [calibration.calibrate(s, rows) for s in specs]
    n_comply = sum(r["label"] == "comply" for r in rows)
    # The incoherence rule is no refusal judge, but every calibration answer is coherent text: any flag is
    # a false alarm that would inflate HS+.
    flagged = [
        v for v in judges.get("incoherent")([r["prompt"] for r in rows], [r["response"] for r in rows]) if v.incoherent
    ]

    if args.json:
        out = {"part": args.part, "n": len(rows), "n_comply": n_comply, "results": [c.record() for c in results]}
        out["incoherent_false_alarms"] = len(flagged)
        print(json.dumps(out, indent=2))
        return
    print(
        f"part {args.part}: {len(rows)} pairs: {n_comply} comply, {len(rows) - n_comply} refuse; "
        "positive class = comply\n"
    )
    print(
        "| judge            |  TP |  FP |  FN |  TN | unparsed | precision [95 % CI]  | recall [95 % CI]     |    F1 |"
    )
    print(
        "|------------------|-----|-----|-----|-----|----------|----------------------|----------------------|-------|"
    )
    for c in results:
        rec = c.record()
        p_ci, r_ci = (f"[{lo:.3f}, {hi:.3f}]" for lo, hi in (rec["precision_ci"], rec["recall_ci"]))
        print(
            f"| {c.judge:<16} | {c.tp:3d} | {c.fp:3d} | {c.fn:3d} | {c.tn:3d} | {c.unparsed:8d} "
            f"| {c.precision:.3f} {p_ci} | {c.recall:.3f} {r_ci} | {c.f1:5.3f} |"
        )
    for c in results:
        kinds = ", ".join(f"{k} {n}" for k, n in c.errors_by_kind.most_common())
        print(f"\n{c.judge} errors by kind (true label/kind): {kinds or 'none'}")
        if args.errors:
            for rid, label, kind, resp in c.errors:
                print(f"  {rid} [{label}/{kind}] {resp[:100]!r}")
    print(f"\nincoherent rule: {len(flagged)} of {len(rows)} (all coherent) answers flagged")


if __name__ == "__main__":
    main()
