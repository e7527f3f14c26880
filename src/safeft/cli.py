"""The ``safeft`` command line. Each verb is a thin wrapper over a Python function tests call directly.

safeft align    [--config F] [--defense N] [k=v ...]  stage 1: align the model for safety, print its path
safeft train    [--config F] [--defense N] [k=v ...]  fine-tune with a defense (resumes an interrupted run)
safeft eval     TARGET [--config F] [...]             evaluate a run directory or a model spec
safeft demo     [--config F] [k=v ...]               align -> fine-tune -> evaluate on the embedded model
safeft ls                                             registered defenses, judges, data sources, domains
safeft validate [--config F] [k=v ...]               check a config and load its data, without training
"""

from __future__ import annotations

import argparse
import json
import logging
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
    print(f"{res.run_dir}  steps={res.steps}  final loss={res.final_loss:.4f}")
    return 0


def cmd_eval(args) -> int:
    from safeft import models
    from safeft.eval.suites import evaluate
    from safeft.train import load_run_model

    cfg = _load_cfg(args)
    target = Path(args.target)
    if (target / "config.yaml").exists() and (target / "checkpoints").exists():
        model, tok = load_run_model(target)
        run_cfg = C.load(target / "config.yaml")
        out = target
        domains = [run_cfg.data.task.split(":")[1]] if run_cfg.data and run_cfg.data.task.startswith("domain:") else []
    else:
        model, tok = models.load(args.target)
        out = Path(cfg.out_dir) / (cfg.run_id or f"eval-{Path(args.target).name}")
        domains = []
    domains = args.domain or domains
    summary = evaluate(model, tok, cfg.eval, out, domains, cfg.model.system_prompt)
    print(json.dumps(summary, indent=2))
    print(f"records under {out / 'eval'}")
    return 0


def cmd_demo(args) -> int:
    from safeft.demo import DEMO_DEFAULTS, demo

    demo(_load_cfg(args, DEMO_DEFAULTS))
    return 0


def cmd_ls(args) -> int:
    from safeft.data.domains import DOMAINS
    from safeft.data.sources import SOURCES
    from safeft.eval.judges import JUDGES
    from safeft.methods import METHODS

    for title, reg in (("defenses", METHODS), ("judges", JUDGES), ("data sources", SOURCES), ("domains", DOMAINS)):
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
    with_cfg(p).set_defaults(fn=cmd_eval)
    with_cfg(sub.add_parser("demo", help="align, fine-tune and evaluate the embedded model")).set_defaults(fn=cmd_demo)
    sub.add_parser("ls", help="list registered components").set_defaults(fn=cmd_ls)
    with_cfg(sub.add_parser("validate", help="check a config and its data")).set_defaults(fn=cmd_validate)

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
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from safeft.data.types import DataError
    from safeft.models import ModelError

    try:
        return args.fn(args)
    except (C.ConfigError, DataError, ModelError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"safeft {args.verb}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
