"""The ``safeft`` command line. Each verb is a thin wrapper over a Python function tests call directly.

safeft align    [--config F] [--defense N] [k=v ...]  stage 1: align the model for safety, print its path
safeft train    [--config F] [--defense N] [k=v ...]  fine-tune with a defense (resumes an interrupted run)
safeft eval     TARGET [--config F] [...]             evaluate a run directory or a model spec
safeft eval     --rescore --judge J runs/<id>         re-judge the stored completions (no model is loaded)
safeft demo     [--config F] [k=v ...]                align -> fine-tune -> evaluate on the embedded model
safeft ls                                             registered defenses, judges, data sources, domains
safeft validate [--config F] [k=v ...]                check a config and load its data, without training
safeft diagnose RUN [--compare RUN2] [...]            layer-wise CKA / KL / ASR over a run's checkpoints, with pictures
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from safeft import config as C


def _load_cfg(args: argparse.Namespace, defaults: dict | None = None) -> C.RunConfig:
    defense = getattr(args, "defense", None)
    if args.config is None and defaults:
        # Defaults first, then the user's overrides on top.
        flat = [f"{k}={json.dumps(v)}" for k, v in _flatten(defaults)]
        return C.load(None, flat + list(args.overrides), defense=defense)
    return C.load(args.config, list(args.overrides), defense=defense)


def _stage_note(cfg: C.RunConfig, verb: str) -> None:
    """Warn when a defense runs in a stage its method is not meant for (allowed: it may be an experiment).

    Fine-tuning-stage methods are ordinary in ``align`` (plain SFT is how stage 1 aligns by default)."""
    from safeft.methods import METHODS

    stage = getattr(METHODS.get(cfg.defense.name), "stage", None)
    want = {"align": ("align", "finetune"), "train": ("finetune", "post")}[verb]
    if stage is not None and stage not in want:
        logging.getLogger("safeft").warning(
            "defense %r is a %s-stage method but runs in `safeft %s`", cfg.defense.name, stage, verb
        )


def _flatten(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def cmd_align(args) -> int:
    from safeft.align import align

    cfg = _load_cfg(args)
    _stage_note(cfg, "align")
    path = align(cfg, out=Path(args.out) if args.out else None, force=args.force)
    print(path)
    return 0


def cmd_train(args) -> int:
    from safeft.train import train

    cfg = _load_cfg(args)
    _stage_note(cfg, "train")
    res = train(cfg, resume=not args.no_resume)
    if int(os.environ.get("RANK", "0")) == 0:  # once, not once per process of a launch
        print(f"{res.run_dir}  steps={res.steps}  final loss={res.final_loss:.4f}")
    return 0


def cmd_eval(args) -> int:
    if args.rescore:
        return cmd_rescore(args)
    if args.judge:
        raise C.ConfigError("--judge goes with --rescore; to pick the judge used while generating, set eval.judge=NAME")
    from safeft import devices, models
    from safeft.eval.suites import evaluate
    from safeft.runs import load_run_model

    cfg = _load_cfg(args)
    target = Path(args.target)
    if (target / "config.yaml").exists() and (target / "checkpoints").exists():
        model, tok = load_run_model(target)
        run_cfg = C.load(target / "config.yaml")
        out = target
        domains = [run_cfg.data.task.split(":")[1]] if run_cfg.data and run_cfg.data.task.startswith("domain:") else []
    else:
        model, tok = models.load(args.target, **devices.load_args(cfg.model))
        out = Path(cfg.out_dir) / (cfg.run_id or f"eval-{Path(args.target).name}")
        domains = []
    domains = args.domain or domains
    summary = evaluate(model, tok, cfg.eval, out, domains, cfg.model.system_prompt, args.suite, args.limit)
    print(json.dumps(summary, indent=2))
    print(f"records under {out / 'eval'}")
    return 0


def cmd_rescore(args) -> int:
    """Re-judge the stored completions of runs/<id>/eval with --judge NAME (repeatable); no generation."""
    from safeft.eval.records import rescore

    if args.overrides or args.config:
        raise C.ConfigError("--rescore takes no config or overrides: it only re-judges stored completions")
    res = rescore(Path(args.target), args.judge or [], args.suite)
    for name, per_judge in res["files"].items():
        for judge, r in per_judge.items():
            print(f"{name}: {judge}: {r['judged']} judged, {r['new']} new, {r['changed']} changed vs stored")
    print(json.dumps(res["summary"], indent=2))
    return 0


def cmd_demo(args) -> int:
    from safeft.demo import DEMO_DEFAULTS, demo

    demo(_load_cfg(args, DEMO_DEFAULTS))
    return 0


def cmd_ls(args) -> int:
    from safeft.data.domains import DOMAINS
    from safeft.data.sources import SOURCES
    from safeft.eval.judges import JUDGES
    from safeft.eval.suites import SUITES
    from safeft.methods import METHODS

    regs = (("defenses", METHODS), ("judges", JUDGES), ("data sources", SOURCES), ("domains", DOMAINS))
    for title, reg in (*regs, ("eval suites", SUITES)):
        print(f"{title}:")
        for name, doc in reg.describe().items():
            stage = getattr(METHODS.get(name), "stage", "") if reg is METHODS else ""
            print(f"  {name:<18} {('[' + stage + '] ') if stage else ''}{doc}")
    return 0


def cmd_validate(args) -> int:
    from safeft import methods
    from safeft.data.sources import load_source

    cfg = _load_cfg(args)
    methods.build(cfg.defense)
    msg = f"config OK: defense={cfg.defense.name}, model={cfg.model.spec}"
    if cfg.data is not None:
        rows = load_source(cfg.data.task)
        msg += f", data {cfg.data.task}: {len(rows)} rows OK"
    print(msg)
    return 0


def cmd_diagnose(args) -> int:
    from safeft.diagnose.drift import DriftConfig
    from safeft.diagnose.localise import Thresholds
    from safeft.diagnose.report import diagnose

    if args.sample not in ("mean", "last", "token"):
        raise C.ConfigError(f"--sample must be mean, last or token, not {args.sample!r}")
    dc = DriftConfig(
        args.n_harmful, args.n_benign, args.batch_size, args.keep_prefix, args.eval_asr, args.fp32_products
    )
    if min(dc.n_harmful, dc.n_benign) < 4 or dc.batch_size < 1 or dc.asr_prompts < 0:
        raise C.ConfigError("--n-harmful and --n-benign must be >= 4, --batch-size >= 1, --eval-asr >= 0")
    th = Thresholds(args.asr_threshold, args.kl_threshold, args.sample)
    res = diagnose(Path(args.run), Path(args.compare) if args.compare else None, args.out and Path(args.out), dc, th)
    print(res["verdict"])
    if res["compare"]:
        print(res["compare"]["verdict"])
    out = Path(args.out) if args.out else Path(args.run) / "diagnose"
    print(f"figures, CSVs and summary.json under {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="safeft", description="Safety-preserving fine-tuning toolkit.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", required=True)

    def with_cfg(p):
        p.add_argument("--config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 defense.name=sft")
        return p

    def with_defense(p):
        p.add_argument(
            "--defense", metavar="NAME", help="the defense to run (shortcut for defense.name=NAME; see `safeft ls`)"
        )
        return p

    p = with_defense(with_cfg(sub.add_parser("align", help="stage 1: safety-align a model")))
    p.add_argument("--out", help="directory for the aligned model (default: the cache)")
    p.add_argument("--force", action="store_true", help="re-align even if a cached result exists")
    p.set_defaults(fn=cmd_align)
    p = with_defense(with_cfg(sub.add_parser("train", help="fine-tune with a defense")))
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in the run directory")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("eval", help="evaluate a run directory or a model")
    p.add_argument("target", help="runs/<id> or a model spec")
    p.add_argument("--domain", action="append", help="utility domain(s) to evaluate")
    p.add_argument(
        "--suite",
        action="append",
        help="suite to run (repeatable): harmful[:<source>], over_refusal, utility[:<domain>], humaneval; "
        "default: eval.suites. With --rescore: only these suites (default: all judged)",
    )
    p.add_argument("--limit", type=int, help="at most N items per suite (smoke runs; recorded in the summary)")
    p.add_argument("--rescore", action="store_true", help="re-judge stored completions (no generation)")
    p.add_argument("--judge", action="append", help="with --rescore: judge spec NAME[:key=value,...] (repeatable)")
    with_cfg(p).set_defaults(fn=cmd_eval)
    with_cfg(sub.add_parser("demo", help="align, fine-tune and evaluate the embedded model")).set_defaults(fn=cmd_demo)
    sub.add_parser("ls", help="list registered components").set_defaults(fn=cmd_ls)
    with_cfg(sub.add_parser("validate", help="check a config and its data")).set_defaults(fn=cmd_validate)

    p = sub.add_parser("diagnose", help="where and when safety collapses: layer-wise CKA, KL and ASR over training")
    p.add_argument("run", help="runs/<id> with checkpoints (train.save_every=N)")
    p.add_argument("--compare", help="a second run, drawn side by side (e.g. SFT vs a defense)")
    p.add_argument("--out", help="output directory (default RUN/diagnose)")
    p.add_argument(
        "--eval-asr",
        type=int,
        default=0,
        metavar="N",
        help="compute ASR on N harmful prompts per checkpoint when the run did not log it (train.eval_every)",
    )
    p.add_argument("--n-harmful", type=int, default=64, help="harmful probe prompts (HarmBench test subset)")
    p.add_argument("--n-benign", type=int, default=64, help="benign probe prompts (task domain test split)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--keep-prefix", action="store_true", help="keep the template prefix shared by all prompts")
    p.add_argument("--fp32-products", action="store_true", help="token-level CKA: fp32 chunk products, fp64 sums")
    p.add_argument("--sample", default="mean", help="sample definition for localisation: mean | last | token")
    p.add_argument("--asr-threshold", type=float, default=0.5, help="onset: first step with ASR >= this")
    p.add_argument("--kl-threshold", type=float, default=0.5, help="onset: first step with harmful KL >= this")
    p.set_defaults(fn=cmd_diagnose)

    # argparse binds `overrides` (nargs="*") right after a leading positional, so in
    # `safeft eval TARGET --config F key=value` the trailing key=value would be "unrecognized".
    # Collect such leftovers as overrides, in order; anything else is still an error.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    level = logging.DEBUG if args.verbose else logging.INFO
    if int(os.environ.get("RANK", "0")) > 0:  # under accelerate launch one process speaks; the others warn
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from safeft.data.types import DataError
    from safeft.eval.generate import GenerationError
    from safeft.eval.sandbox import SandboxError
    from safeft.models import ModelError

    try:
        return args.fn(args)
    except (C.ConfigError, DataError, ModelError, KeyError, GenerationError, SandboxError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"safeft {args.verb}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
