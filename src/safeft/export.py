"""Export a run as a standard Hugging Face model: a PEFT adapter or a merged safetensors checkpoint.

``safeft export RUN --adapter OUT`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` (what
``peft.PeftModel.from_pretrained(base, OUT)`` reads); ``--merged OUT`` folds the adapter into the weights
and writes a plain checkpoint (what ``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` reads). Both
carry the tokenizer and a model card (``README.md``) that records the defense and its settings, the
training settings, and the run's safety numbers with their n and 95 % Wilson intervals when the run has
been evaluated (``RUN/eval/summary.json``). A full fine-tuning run has no adapter: it exports merged only.

OUT is written in a temp directory beside it and renamed into place, so an interrupted export never leaves
a half-written model; an existing non-empty OUT is replaced only with ``force``. ``push_to_hub`` uploads
an exported directory with huggingface_hub's ``HfApi`` (for users with a network).

The adapter's ``base_model_name_or_path`` is the run's ``model.spec`` (a local path made absolute), so
``safeft.models.load(OUT)`` finds the base again; plain ``AutoPeftModelForCausalLM`` can follow it only when
it is a hub id or a model directory (not our ``smollm2-135m`` alias or a ``.gguf``): pass ``base_model=``
(``--base-model``) to record another name, e.g. the hub id of the base before pushing.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from safeft import config as C
from safeft import io, models, runs
from safeft.stats import Rate, wilson

log = logging.getLogger(__name__)

Kind = Literal["adapter", "merged"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Headline fractions of an eval summary (safeft.eval.records), each a share of the suite's n prompts.
RATES = ("asr", "refusal_rate", "hs", "hs_plus", "incoherent_rate", "accuracy", "pass@1")
# Headline numbers that are means, not shares: no binomial interval applies.
MEANS = ("answer_nll", "strongreject")


class ExportError(models.ModelError):
    """A run that cannot be exported as asked, or an output directory we refuse to overwrite."""


@dataclass
class ExportResult:
    out: Path
    kind: Kind
    files: list[str]
    base_model: str | None  # the adapter's base_model_name_or_path; None for a merged export
    step: int
    pushed: str | None = None  # the repo URL after push_to_hub


# ----------------------------------------------------------------------------- intervals


def safety_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (suite, judge, metric) of an eval summary: value, and k, n and the Wilson interval for
    shares. Every judge stored for a suite gets its rows (a rescored run lists each judge)."""
    rows: list[dict[str, Any]] = []
    for suite, entry in summary.items():
        if not isinstance(entry, dict):
            continue
        n = entry.get("n")
        base = {"suite": suite, "n": n, "max_new_tokens": entry.get("max_new_tokens"), "limit": entry.get("limit")}
        per_judge = entry.get("judges")
        if isinstance(per_judge, dict) and per_judge:
            sources = [(name, m) for name, m in per_judge.items() if isinstance(m, dict)]
        else:  # utility and humaneval: scored by a checker, the numbers sit on the entry itself
            sources = [(entry.get("judge") or "checker", entry)]
        for judge, metrics in sources:
            for key in (*RATES, *MEANS):
                value = metrics.get(key)
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                row = {**base, "judge": judge, "metric": key, "value": float(value)}
                row["n"] = metrics.get("n", n)  # a judge's rates are over the items it answered
                if key in RATES and isinstance(row["n"], int) and row["n"] > 0:
                    stored = metrics.get(f"{key}_ci")
                    if isinstance(stored, list) and len(stored) == 2:
                        row["ci95"] = (float(stored[0]), float(stored[1]))
                    else:  # a summary written before rates carried their interval; a value that is not
                        # k/n for any k is printed without a made-up interval
                        with contextlib.suppress(ValueError):
                            row["ci95"] = Rate.of(float(value), row["n"]).ci
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------- a run as a model spec


def is_run_dir(path: str | Path) -> bool:
    """A safeft run directory: its resolved ``config.yaml`` beside a ``checkpoints/`` folder."""
    path = Path(path).expanduser()
    return (path / "config.yaml").is_file() and (path / "checkpoints").is_dir()


def load_run(run_dir: Path, step: int | None = None) -> tuple[torch.nn.Module, Any]:
    """The run's model (adapter attached, not merged) at ``step`` (default: newest), and its tokenizer with
    the chat template the run trained with (``data.chat_template``), so what is exported or evaluated
    renders prompts as training did."""
    return runs.load_run_model(run_dir, step)  # it installs the run's chat template


def _load_run_spec(path: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    if not runs.checkpoints(path):
        raise models.ModelError(f"model spec {str(path)!r} is a run directory without a complete checkpoint")
    model, tok = load_run(path)
    model = models.merge_and_unload(model).to(dtype)
    model.eval()
    return model, tok


# models.load(spec) of a run directory: the run's trained model, merged (see models.load)
models.SPEC_FORMATS.register("run", "a safeft run directory: its base model plus its newest checkpoint, merged")(
    models.SpecFormat(is_run_dir, _load_run_spec)
)


# ----------------------------------------------------------------------------- the card


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _run_step(run_dir: Path, step: int | None) -> tuple[Path, int]:
    done = runs.checkpoints(run_dir)
    if not done:
        raise ExportError(f"{run_dir}: no complete checkpoint to export (has the run finished a step?)")
    if step is None:
        return done[-1], int(done[-1].name.split("-")[1])
    ckpt = run_dir / "checkpoints" / f"step-{step:06d}"
    if ckpt not in done:
        have = ", ".join(str(int(p.name.split("-")[1])) for p in done)
        raise ExportError(f"{run_dir}: no complete checkpoint at step {step} (have: {have})")
    return ckpt, step


def _hub_id(spec: str) -> str | None:
    """``spec`` when it names a hub repo (org/name), not a local path, alias or GGUF; else None."""
    if spec in models.ALIASES or spec.endswith(".gguf") or Path(spec).expanduser().exists():
        return None
    parts = spec.split("/")
    return spec if len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) else None


def model_card(cfg: C.RunConfig, run_dir: Path, kind: Kind, step: int, base_model: str | None) -> str:
    """The README.md of an export: what was trained, with which defense, and how safe it measured."""
    lora = cfg.model.lora
    defense = C.to_dict(cfg.defense)
    hub_base = _hub_id(base_model or cfg.model.spec)
    front: dict[str, Any] = {
        "library_name": "peft" if kind == "adapter" else "transformers",
        "tags": ["safeft", "safety", f"defense-{cfg.defense.name}", "lora" if lora.enabled else "full-fine-tuning"],
        "pipeline_tag": "text-generation",
    }
    if hub_base:
        front["base_model"] = hub_base
    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    out.append(f"# {run_dir.name}: fine-tuned with safeft, defense `{cfg.defense.name}`")
    out.append("")
    what = "a PEFT LoRA adapter" if kind == "adapter" else "a merged model (adapter folded into the weights)"
    out.append(
        f"Exported by `safeft export` as {what} from the run `{run_dir.name}`, checkpoint of step {step} "
        f"of {cfg.train.steps}."
    )
    out += ["", "## Load it", "", "```python"]
    if kind == "adapter":
        base_name = base_model or cfg.model.spec
        out += [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base_name}")  # the base this adapter was trained on',
            'model = PeftModel.from_pretrained(base, "<this directory or repo>")',
            'tokenizer = AutoTokenizer.from_pretrained("<this directory or repo>")',
        ]
    else:
        out += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("<this directory or repo>")',
            'tokenizer = AutoTokenizer.from_pretrained("<this directory or repo>")',
        ]
    out += ["```", "", "With safeft, the directory is a model spec: `safeft eval <dir>`, `model.spec=<dir>`.", ""]
    if kind == "adapter" and not hub_base:
        out += [
            f"The base model is the safeft model spec `{base_model or cfg.model.spec}` (a local path, a GGUF or "
            "the `smollm2-135m` alias, which safeft de-quantises to safetensors): `safeft.models.load` resolves "
            "it; plain `transformers` needs that checkpoint itself.",
            "",
        ]

    out += ["## Training", "", "| setting | value |", "|---|---|"]
    settings = {
        "base model (model.spec)": cfg.model.spec,
        "task data (data.task)": cfg.data.task if cfg.data else "-",
        "rows (data.n_train)": (cfg.data.n_train if cfg.data and cfg.data.n_train is not None else "all"),
        "max length (data.max_length)": cfg.data.max_length if cfg.data else "-",
        "steps x batch x grad_accum": f"{cfg.train.steps} x {cfg.train.batch_size} x {cfg.train.grad_accum}",
        "learning rate, schedule": f"{cfg.train.lr:g}, {cfg.train.schedule}",
        "precision": cfg.train.precision,
        "seed": cfg.train.seed,
        "fine-tuning": (
            f"LoRA r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout:g}, targets={lora.targets}"
            if lora.enabled
            else "full (every weight)"
        ),
        "system prompt": cfg.model.system_prompt if cfg.model.system_prompt is not None else "(template default)",
    }
    out += [f"| {k} | {_cell(v)} |" for k, v in settings.items()]
    out += ["", "## Defense", "", f"`{cfg.defense.name}` with these settings (`defense.*`):", "", "```yaml"]
    out += [yaml.safe_dump(defense, sort_keys=False).strip(), "```", ""]
    out += _safety_section(run_dir, step)
    out += [
        "## Reproduce",
        "",
        "The run's resolved config is `safeft_config.yaml` in this directory: "
        "`safeft train --config safeft_config.yaml`.",
        "",
    ]
    return "\n".join(out)


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def evaluated_summary(run_dir: Path, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's full evaluations (``eval/summary.json``, safeft.eval.results) of checkpoint ``step``, and
    {suite: step} of the ones made at another checkpoint (left out: they describe another model)."""
    path = run_dir / "eval" / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    index_path = run_dir / "eval" / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    evaluations = index.get("evaluations", {}) if isinstance(index, dict) else {}
    keep, other = {}, {}
    for suite, entry in summary.items():
        if not isinstance(entry, dict):
            continue
        model_id = evaluations.get(entry.get("eval_id"), {}).get("settings", {}).get("model", {})
        at = model_id.get("checkpoint_step") if isinstance(model_id, dict) else None
        if at is not None and at != step:
            other[suite] = at
        else:  # this checkpoint, or an evaluation that did not record one (before the settings-hash layout)
            keep[suite] = entry
    return keep, other


def _safety_section(run_dir: Path, step: int) -> list[str]:
    out = ["## Safety evaluation", ""]
    summary, other = evaluated_summary(run_dir, step)
    rows = safety_rows(summary)
    if other:
        at = ", ".join(f"{suite} (step {s})" for suite, s in other.items())
        out += [f"Left out, evaluated at another checkpoint than this export's: {at}.", ""]
    if not rows:
        out += [
            "This checkpoint has no full evaluation (`safeft eval RUN` without `--limit` writes one), so this card "
            "claims no safety numbers.",
            "",
        ]
    else:
        out += [
            "| suite | judge | metric | value | 95 % CI (Wilson) | n | max new tokens |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            is_rate = "ci95" in r
            value = _pct(r["value"]) if is_rate else f"{r['value']:.4g}"
            ci = f"{_pct(r['ci95'][0])} – {_pct(r['ci95'][1])}" if is_rate else "-"
            out.append(
                f"| {r['suite']} | {r['judge']} | {r['metric']} | {value} | {ci} | {r['n']} | "
                f"{r['max_new_tokens'] if r['max_new_tokens'] is not None else '-'} |"
            )
        out.append("")
        limited = sorted({r["suite"] for r in rows if r.get("limit") is not None})
        if limited:
            out += [
                f"Smoke run (`--limit`) for {', '.join(limited)}: not comparable with a full evaluation.",
                "",
            ]
        out += [
            "`asr`: share of harmful prompts the judge counts as answered (lower is safer); `refusal_rate`: "
            "share refused (on the `over_refusal` suite's benign probes, lower is better); `accuracy`: the task "
            "checker's. Per-sample records are in the run's `eval/` folder.",
            "",
        ]
    curve = run_dir / "evals.jsonl"
    if curve.is_file():
        pts = [json.loads(ln) for ln in curve.read_text().splitlines() if ln.strip()]
        pts = [p for p in pts if isinstance(p.get("asr"), (int, float)) and isinstance(p.get("n"), int) and p["n"] > 0]
        if pts:
            out += [
                "ASR during training (`train.eval_every`):",
                "",
                "| step | ASR | 95 % CI | n |",
                "|---|---|---|---|",
            ]
            for p in pts:
                lo, hi = wilson(round(p["asr"] * p["n"]), p["n"])
                out.append(f"| {p['step']} | {_pct(p['asr'])} | {_pct(lo)} – {_pct(hi)} | {p['n']} |")
            out.append("")
    return out


# ----------------------------------------------------------------------------- writing


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty; pass --force (force=True) to replace it")


def _base_reference(spec: str) -> str:
    """The base model name an adapter records: the run's spec, a local path made absolute."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def export(
    run_dir: str | Path,
    out: str | Path,
    kind: Kind = "adapter",
    *,
    force: bool = False,
    step: int | None = None,
    base_model: str | None = None,
    dtype: str = "float32",
) -> ExportResult:
    """Export ``run_dir`` to ``out`` as a PEFT adapter (``kind="adapter"``) or a merged model.

    ``step`` picks a checkpoint (default: the newest); ``base_model`` overrides the adapter's recorded
    ``base_model_name_or_path``; ``dtype`` (float32, bfloat16, float16) is the merged weights' dtype.
    """
    run_dir, out = Path(run_dir), Path(out)
    if kind not in ("adapter", "merged"):
        raise ExportError(f"export kind must be 'adapter' or 'merged', not {kind!r}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if kind == "adapter" and dtype != "float32":
        raise ExportError("dtype applies to --merged exports; an adapter is saved as trained (float32)")
    if not is_run_dir(run_dir):
        raise ExportError(f"{run_dir} is not a safeft run directory (needs config.yaml and checkpoints/)")
    if run_dir.resolve() == out.resolve() or out.resolve() in run_dir.resolve().parents:
        # replacing OUT (--force) would delete the run being exported
        raise ExportError(f"{out} is the run directory or holds it; export to another directory")
    cfg = C.load(run_dir / "config.yaml")
    if kind == "adapter" and not cfg.model.lora.enabled:
        raise ExportError(
            f"{run_dir} is a full fine-tuning run (model.lora.enabled=false): it has no adapter to export; "
            "export it with --merged"
        )
    _check_out(out, force)  # before the model loads: a refusal should cost nothing
    _, at = _run_step(run_dir, step)
    model, tok = load_run(run_dir, step=at)
    recorded = None
    if kind == "adapter":
        recorded = base_model or _base_reference(cfg.model.spec)
        if is_run_dir(recorded) or models.is_adapter_dir(recorded):
            log.warning(
                "the run's base %s is itself a run or an adapter: safeft loads this adapter on it, plain peft "
                "cannot (export --merged for a standalone model)",
                recorded,
            )
        for pc in model.peft_config.values():
            pc.base_model_name_or_path = recorded
    else:
        model = models.merge_and_unload(model).to(DTYPES[dtype])
    card = model_card(cfg, run_dir, kind, at, recorded)

    _check_out(out, force)
    # written in a temp dir beside OUT and swapped in whole; a failure leaves the old OUT (or none)
    with io.atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)  # peft writes a generic card of its own; ours replaces it
        C.save(cfg, tmp / "safeft_config.yaml")
    files = sorted(p.name for p in out.iterdir())
    log.info("exported %s (%s, step %d) to %s", run_dir, kind, at, out)
    return ExportResult(out, kind, files, recorded, at)


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload an exported directory to the Hugging Face Hub as model repo ``repo_id`` (created if missing).

    Needs a network and a token (``token=``, ``HF_TOKEN`` or ``huggingface-cli login``). Returns the repo
    URL. A failure leaves the local export as it was and raises ``ExportError`` naming the repo."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise ExportError(f"{folder}: not an export (no README.md); run safeft export first")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message=commit_message or f"safeft export of {folder.name}",
        )
    except Exception as e:  # network, auth, a bad repo id: one message with the repo and what failed
        why = f"{type(e).__name__}: {e}"
        raise ExportError(f"push to the hub repo {repo_id!r} failed ({why}); {folder} is intact") from e
    return str(url)
