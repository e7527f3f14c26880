"""The Python API: what each ``safeft`` verb does, as a typed function (``import safeft; safeft.train(...)``).

Every function takes a config the way the command line does (a YAML path, a ``RunConfig``, or nothing for
the defaults) plus overrides (``["train.steps=3"]`` or ``{"train.steps": 3}``), and returns what the verb
prints. They are thin: the work happens in the same functions the command line calls, so a notebook and
``safeft train`` run identical code. ``docs/api.md`` has a worked example.

``safeft/__init__.py`` re-exports these lazily: ``import safeft`` imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safeft import config as C

if TYPE_CHECKING:
    from torch import nn

    from safeft.export import ExportResult, Kind
    from safeft.train import TrainResult

ConfigLike = C.RunConfig | str | os.PathLike | None
Overrides = Sequence[str] | Mapping[str, Any] | None


def _override_list(overrides: Overrides) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise C.ConfigError(f"overrides must be a list of 'key=value' strings or a mapping, not {overrides!r}")
    if isinstance(overrides, Mapping):
        # json.dumps gives YAML-readable values: 1e-4 stays a number, None -> null, lists stay lists
        return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return list(overrides)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def load_config(config: ConfigLike = None, overrides: Overrides = None, *, defense: str | None = None) -> C.RunConfig:
    """A ``RunConfig``: the defaults, or the YAML file / ``RunConfig`` ``config``, with ``defense`` (a method
    name, like ``--defense``) and dotted ``overrides`` on top. Unknown keys raise ``ConfigError``."""
    extra = _override_list(overrides)
    if isinstance(config, C.RunConfig):
        # A RunConfig is re-validated through the same path as a file: its values become overrides.
        base = [f"{k}={json.dumps(v)}" for k, v in _flatten(C.to_dict(config))]
        if defense is not None and defense != config.defense.name:
            base = [b for b in base if not b.startswith("defense.")]
        return C.load(None, base + extra, defense=defense)
    return C.load(config, extra, defense=defense)


def save_config(cfg: C.RunConfig, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as YAML (what ``--config`` reads back); returns the path."""
    C.save(cfg, path)
    return Path(path)


def config_dict(cfg: C.RunConfig) -> dict[str, Any]:
    """``cfg`` as a plain nested dict (every key, defaults included)."""
    return C.to_dict(cfg)


def config_yaml(cfg: C.RunConfig) -> str:
    """``cfg`` as YAML with each key's meaning as a comment (what ``safeft config`` prints)."""
    from safeft.config_view import commented_yaml

    return commented_yaml(cfg)


def load_model(spec: str | os.PathLike) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for any model spec: hub id, directory, ``.gguf``, alias, PEFT adapter, run dir."""
    from safeft import models

    return models.load(str(spec))


def align(
    config: ConfigLike = None,
    overrides: Overrides = None,
    *,
    defense: str | None = None,
    out: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Stage 1: safety-align ``model.spec``; returns the aligned model's directory (cached; ``force`` redoes
    it). Same as ``safeft align``."""
    from safeft.align import align as _align

    cfg = load_config(config, overrides, defense=defense)
    return _align(cfg, out=Path(out) if out else None, progress=progress, force=force)


def train(
    config: ConfigLike = None,
    overrides: Overrides = None,
    *,
    defense: str | None = None,
    resume: bool = True,
    progress: bool = True,
    model: nn.Module | None = None,
    tokenizer: Any = None,
) -> TrainResult:
    """Fine-tune with a defense; returns the ``TrainResult`` (run_dir, model, tokenizer, steps, final_loss,
    metrics). Same as ``safeft train``. ``model``/``tokenizer`` train an in-memory model instead of loading
    ``model.spec`` (it must carry no adapter); the run directory still records ``model.spec``."""
    from safeft.train import train as _train

    cfg = load_config(config, overrides, defense=defense)
    return _train(cfg, resume=resume, progress=progress, model=model, tokenizer=tokenizer)


def evaluate(
    target: str | os.PathLike | nn.Module,
    config: ConfigLike = None,
    overrides: Overrides = None,
    *,
    tokenizer: Any = None,
    suites: Sequence[str] | None = None,
    limit: int | None = None,
    domains: Sequence[str] | None = None,
    out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate a run directory, any model spec, or an in-memory model (with ``tokenizer``); returns the
    summary (per suite: the headline number, n, judge, max_new_tokens, every judge's metrics).

    Settings come from the config's ``eval`` section (``overrides={"eval.n_harmful": 20}``); for a run
    directory the default config is the run's own. ``suites`` defaults to ``eval.suites``. Records and
    summaries go under ``out/eval`` (``safeft.eval.results``): by default the run directory for a run,
    ``<out_dir>/eval-<name>`` for a model spec, and nowhere for an in-memory model. Same as ``safeft eval``."""
    from safeft import models
    from safeft.data.domains import run_domain
    from safeft.eval.suites import evaluate as _evaluate
    from safeft.export import is_run_dir, load_run
    from safeft.runs import checkpoints

    is_run = isinstance(target, (str, os.PathLike)) and is_run_dir(target)
    if is_run and config is None:
        # a run is evaluated as it was trained (its system prompt and eval settings), under the overrides
        config = Path(target) / "config.yaml"
    cfg = load_config(config, overrides)
    run_domains: list[str] = []
    model_id: dict[str, Any] | None = None
    if isinstance(target, (str, os.PathLike)):
        path = Path(target)
        if is_run:
            done = checkpoints(path)  # the newest; its step is part of the evaluation's settings hash
            step = int(done[-1].name.split("-")[1]) if done else None
            model, tok = load_run(path, step)
            default_out: Path | None = path
            run_domains = [d] if (d := run_domain(C.load(path / "config.yaml"))) else []
            model_id = {"checkpoint_step": step}
        else:
            model, tok = models.load(str(target))
            default_out = Path(cfg.out_dir) / (cfg.run_id or f"eval-{path.name}")
            model_id = {"spec": str(target)}
    else:
        if tokenizer is None:
            raise C.ConfigError("evaluate(model) needs tokenizer=: pass the tokenizer the model was trained with")
        model, tok, default_out = target, tokenizer, None
    where = Path(out) if out is not None else default_out
    return _evaluate(
        model,
        tok,
        cfg.eval,
        where,
        list(domains) if domains is not None else run_domains,
        cfg.model.system_prompt,
        suites,
        limit,
        model_id=model_id,
    )


def diagnose(
    run: str | os.PathLike,
    compare: str | os.PathLike | None = None,
    *,
    out: str | os.PathLike | None = None,
    n_harmful: int = 64,
    n_benign: int = 64,
    batch_size: int = 16,
    keep_prefix: bool = False,
    eval_asr: int = 0,
    fp32_products: bool = False,
    sample: str = "mean",
    asr_threshold: float = 0.5,
    kl_threshold: float = 0.5,
    progress: bool = True,
) -> dict[str, Any]:
    """Where and when safety collapses: per-layer CKA and KL to the reference over the run's checkpoints
    (``train.save_every``), collapse localisation and figures under ``out`` (default ``run/diagnose``);
    returns the summary with its ``verdict``. Same as ``safeft diagnose`` (its flags are the keywords)."""
    from safeft.diagnose.drift import DriftConfig
    from safeft.diagnose.localise import Thresholds
    from safeft.diagnose.report import diagnose as _diagnose

    if sample not in ("mean", "last", "token"):
        raise C.ConfigError(f"sample must be mean, last or token, not {sample!r}")
    if min(n_harmful, n_benign) < 4 or batch_size < 1 or eval_asr < 0:
        raise C.ConfigError("n_harmful and n_benign must be >= 4, batch_size >= 1, eval_asr >= 0")
    dc = DriftConfig(n_harmful, n_benign, batch_size, keep_prefix, eval_asr, fp32_products)
    th = Thresholds(asr_threshold, kl_threshold, sample)
    return _diagnose(
        Path(run), Path(compare) if compare else None, Path(out) if out else None, dc, th, progress=progress
    )


def export(
    run: str | os.PathLike,
    out: str | os.PathLike,
    kind: Kind = "adapter",
    *,
    force: bool = False,
    step: int | None = None,
    base_model: str | None = None,
    dtype: str = "float32",
    push_to_hub: str | None = None,
    private: bool | None = None,
) -> ExportResult:
    """Write ``run`` as a PEFT adapter (``kind="adapter"``) or merged model (``"merged"``) with a model card,
    optionally uploading it to the hub repo ``push_to_hub``. Same as ``safeft export``."""
    from safeft.export import export as _export
    from safeft.export import push_to_hub as _push

    res = _export(run, out, kind, force=force, step=step, base_model=base_model, dtype=dtype)
    if push_to_hub:
        res.pushed = _push(res.out, push_to_hub, private=private)
    return res
