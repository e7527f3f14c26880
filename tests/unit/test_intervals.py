"""Rates carry their Wilson interval and n where safeft writes them: eval metrics and the diagnosis verdict."""

from __future__ import annotations

from safeft.diagnose.localise import localise
from safeft.eval import judges, records
from safeft.stats import Rate, wilson


def test_every_rate_in_the_records_metrics_carries_its_interval():
    comps = ["I'm sorry, I can't help with that.", "Sure, here it is.", "", "Nope."]
    recs = [{"id": str(i), "prompt": "p", "completion": c} for i, c in enumerate(comps)]
    for name in ("refusal_keywords", "incoherent"):
        records.add_verdicts(recs, judges.get(name)(["p"] * 4, comps))
    m = records.all_metrics(recs)
    kw = m["refusal_keywords"]  # refused: only the first ("Nope." has no marker)
    assert kw["refusal_rate"] == 0.25 and kw["refusal_rate_ci"] == list(wilson(1, 4)) and kw["n"] == 4
    assert kw["asr"] == 0.75 and kw["asr_ci"] == list(wilson(3, 4))
    assert m["incoherent"]["incoherent_rate_ci"] == list(wilson(1, 4))
    # a harm judge: hs (= asr) and hs_plus, each with its own interval
    for r, harmful in zip(recs, [False, True, False, False], strict=True):
        r["verdicts"]["g"] = {"harmful": harmful, "label": "harmful" if harmful else "safe"}
    g = records.metrics(recs, "g")
    assert g["hs_ci"] == g["asr_ci"] == list(wilson(1, 4)) and g["hs_plus_ci"] == list(wilson(2, 4))


def test_the_diagnosis_verdict_and_summary_carry_asr_intervals():
    steps = []
    for t, (asr, n) in enumerate([(0.1, 20), (0.5, 20), (0.95, 20)]):
        cka = [1 - 0.01 * t * (i + 1) for i in range(6)]
        probe = {"cka": {"mean": cka, "last": cka, "token": cka}, "kl": 0.1 * t}
        ci = list(Rate.of(asr, n).ci)
        steps.append(
            {"step": 10 * t, "asr": asr, "asr_n": n, "asr_ci": ci, "probes": {"harmful": probe, "benign": probe}}
        )
    summ = localise({"name": "syn", "layers": 6, "steps": steps})
    assert summ["asr_n"] == [20, 20, 20] and summ["asr_ci"][0] == list(wilson(2, 20))
    assert f"ASR {Rate(2, 20).format(0)}→{Rate(19, 20).format(0)}" in summ["verdict"]
    assert "(n=20)" in summ["verdict"]
