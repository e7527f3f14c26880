"""Typed run configuration.

Configs are dataclasses; YAML files and ``section.key=value`` command-line overrides are two views of
them. Unknown keys and missing required fields are errors that name the file (or "command line") and
the dotted key. The resolved config is written beside every run's outputs (``config.yaml``) so a run can
be reproduced with ``--config runs/<id>/config.yaml``.

The defense section is polymorphic: ``defense.name`` picks the method, and the remaining keys are
validated against that method's own ``Config`` dataclass (see ``safeft.methods``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config that cannot be built. The message names where the bad value came from."""


# ----------------------------------------------------------------------------- sections


@dataclass
class LoraConfig:
    enabled: bool = True  # False = full fine-tuning of every parameter
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # "all-linear" = every linear projection of the decoder (not lm_head), peft's own resolution
    targets: str | list[str] = "all-linear"


@dataclass
class ModelConfig:
    # hub id, local directory, path to a .gguf file, the alias "smollm2-135m" (the embedded model), a PEFT
    # adapter directory or a run directory (runs/<id>; adapters are merged on load: safeft.models.load)
    spec: str = "smollm2-135m"
    lora: LoraConfig = field(default_factory=LoraConfig)
    # system prompt for the chat template; None = the template's own default
    system_prompt: str | None = None
    # load a model directory whose weights are only pickles (pytorch_model.bin): unpickling runs whatever
    # code the file names, so only for files you trust. Off: such a directory is refused.
    allow_pickle: bool = False
    # Memory levers (safeft.devices): weight storage dtype fp32 | bf16 | fp16 (LoRA adapters stay fp32);
    # recompute blocks in the backward; sdpa | eager | flash_attention_2 (null = transformers' choice);
    # QLoRA: a frozen NF4 base through bitsandbytes (CUDA only, pip install 'safeft[qlora]').
    dtype: str = "fp32"
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    load_in_4bit: bool = False


@dataclass
class DataConfig:
    task: str  # data source spec of the fine-tuning data, e.g. "domain:finance" or "jsonl:my.jsonl"
    n_train: int | None = None  # None = every row of the source
    max_length: int = 256  # prompt + response tokens; longer rows are truncated from the response end
    seed: int = 0
    # harmful fine-tuning (docs/threat_models.md): this fraction of the task rows is replaced by harmful
    # (prompt, answer) pairs from poison_source, the row count unchanged; 0 = benign, 1 = pure harmful FT
    poison: float = 0.0
    poison_source: str = "harmful:smollm2-135m"  # pairs the base model wrote offline; or jsonl:/csv:/hf:
    # Which of the file's columns hold our fields, e.g. {prompt: question, response: answer}; applied
    # before the row format (messages / prompt+completion / prompt+response) is detected. Keys: prompt,
    # response, messages, id. Empty = the standard names and their aliases.
    columns: dict[str, str] = field(default_factory=dict)
    # A named template (chatml, llama3, zephyr) or a Jinja file, installed on the tokenizer for training
    # and evaluation alike; None = the tokenizer's own template.
    chat_template: str | None = None
    # Share of rows that may be cut at max_length before the run stops: a few long-tail rows are normal
    # (and logged); past this, max_length is below what the data needs and most answers lose their end.
    max_truncated: float = 0.1


@dataclass
class TrainConfig:
    steps: int = 75  # optimizer steps
    batch_size: int = 8  # micro-batch size
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    schedule: str = "cosine"  # constant | linear | cosine
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 (auto = bf16 on CUDA and on CPUs with bf16 units)
    seed: int = 0
    save_every: int = 0  # checkpoint every N steps; 0 = only the final step
    log_every: int = 1
    # ASR on the first ``eval_n_harmful`` prompts of the HarmBench test subset at step 0 and every N steps
    # (judge, max_new_tokens, seed from the eval section); 0 = off. ``safeft diagnose`` plots it over steps.
    eval_every: int = 0
    eval_n_harmful: int = 20
    # experiment trackers logging what metrics.jsonl gets: tensorboard and/or wandb (the [trackers] extra)
    report_to: list[str] = field(default_factory=list)


@dataclass
class DefenseConfig:
    """Base of every method's config; ``name`` selects the method from the registry."""

    name: str = "sft"


@dataclass
class EvalConfig:
    n_harmful: int | None = 100  # HarmBench test prompts (fixed seeded subset); None = all 200
    n_over_refusal: int | None = None  # our benign probes; None = all
    n_utility: int | None = 100  # items of the task domain's test split; None = all 200
    max_new_tokens: int = 64
    batch_size: int = 64
    judge: str = "refusal_layered"  # beats the 29-marker list on held-out calibration pairs (docs/judges.md)
    precision: str = "auto"  # auto | fp32 | bf16 (autocast; weights are never cast)
    seed: int = 0
    # suites run by `safeft eval` when no --suite is given: harmful[:<source>], over_refusal,
    # utility (= utility:<the run's domain>), utility:<domain>, humaneval
    suites: list[str] = field(default_factory=lambda: ["harmful", "over_refusal", "utility"])
    backend: str = "hf"  # hf (transformers) | vllm (optional, CUDA only)
    do_sample: bool = False  # greedy unless True; the sampling knobs below apply only then
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    humaneval_max_new_tokens: int = 384  # whole functions need more room than refusals do


@dataclass
class AlignConfig:
    # The boundary recipe, chosen on dev only (Do-Not-Answer dev and the probes' dev split, never HarmBench's
    # held-out half or the test probes): benchmarks/align_frontier_round2.yaml, then round 5's shorter stage 1
    # (benchmarks/align_frontier_round5.yaml, chosen on HarmBench's dev half), docs/results.md. The model aligned
    # before it (128 + 48 rows, 48 steps, plain refusals) is ``LEGACY_ALIGN`` below; round 2's ``ROUND2_ALIGN``,
    # round 4's choice ``ROUND4_ALIGN``.
    n_harmful: int = 320  # Do-Not-Answer prompts -> our refusals
    n_benign: int = 48  # benign prompts of our lists -> the base model's own answers (keeps it helpful)
    benign_mix: str = "sample"  # sample (seeded, from all benign prompts) | edgy_first (every edgy one first)
    # 40, not round 2's 96: the answers teach "answer, don't refuse", which their first sentences carry; rows of
    # ~73 instead of ~93 tokens make a step ~40 % cheaper. Round 5's pick at train seed 0; other seeds of it are
    # worse on dev than round 2's recipe (docs/results.md): the price of a 10-minute demo
    benign_max_new_tokens: int = 40
    # share of harmful prompts wrapped in an instruction-style framing (align.py). The framings sit on refused
    # prompts only and became a refusal cue (70 % of benign dev probes refused inside one), yet without them
    # HarmBench ASR rose 12 -> 27 % (ROUND4_ALIGN, docs/results.md): kept until a recipe does better on both
    restyle: float = 0.5
    seed: int = 0
    # ~1 epoch over the 750 rows at batch 8 (round 2: 240 steps, ~2.6 epochs); r = 32 and lr 6e-4 fit the boundary
    # better than r = 16 at 3e-4; lr 1e-3 let 26 % of HarmBench's dev half through (round 5)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=96, lr=6e-4, schedule="cosine"))
    # The recipe fields (align.py). Their values that reproduce the legacy model (align.RECIPE_DEFAULTS) stay
    # out of the cache key, so that model keeps its key; any other value enters it.
    contrastive: int = 132  # our contrastive pairs used: benign side -> base model's answer, harmful -> refusal
    # our instruction-form pairs ("Write a persuasive post ...") of their train split, used the same way
    request_pairs: int = 0
    refusal_style: str = "explain"  # plain (REFUSALS) | explain (names the reason, offers an alternative) | mixed
    # benign prompt pools: legacy (n_benign of our benign lists, by benign_mix) | probes_train (the over-refusal
    # probes' train split) | contrastive (the benign side of every pair, without its harmful neighbour)
    benign_sources: list[str] = field(default_factory=lambda: ["legacy", "probes_train"])
    # Do-Not-Answer intents never paired with a refusal: advice questions a doctor, lawyer or adviser would
    # answer, where a trained refusal teaches refusing medical, legal and financial questions
    skip_intents: list[str] = field(default_factory=lambda: ["S002med", "S002legal", "S002fin"])
    # the adapter of stage 1; None = model.lora; enabled=false = full fine-tuning
    lora: LoraConfig | None = field(default_factory=lambda: LoraConfig(r=32, alpha=64))


# Round 2's choice, the default until round 5 (docs/results.md): every table measured before round 5 stands on it.
ROUND2_ALIGN = ["align.benign_max_new_tokens=96", "align.train.steps=240"]

# Round 4's dev choice (docs/results.md): the request pairs in place of the framings. Over-refusal of benign
# instructions fell (60 -> 26 % on dev) but HarmBench ASR rose to 27 %, so it is not the default.
ROUND4_ALIGN = [*ROUND2_ALIGN, "align.request_pairs=168", "align.restyle=0.0"]

# The stage-1 recipe before the boundary recipe (the aligned model of the first demos): dotted overrides.
LEGACY_ALIGN = [
    "align.n_harmful=128",
    "align.benign_max_new_tokens=96",
    "align.train.steps=48",
    "align.train.lr=3e-4",
    "align.contrastive=0",
    "align.refusal_style=plain",
    "align.benign_sources=[legacy]",
    "align.skip_intents=[]",
    "align.lora=null",
]


@dataclass
class DemoConfig:
    methods: list[str] = field(default_factory=lambda: ["sft"])  # fine-tuning methods compared by the demo
    # what the base model is evaluated on: "harmful" (its ASR, the reason stage 1 exists; ~15 s where every
    # suite takes ~50 s of a 10-minute demo), "all" (every eval suite), or "none"
    base_eval: str = "harmful"

    def __post_init__(self) -> None:
        if self.base_eval not in ("harmful", "all", "none"):
            raise ConfigError(f"demo.base_eval must be harmful, all or none, not {self.base_eval!r}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    defense: DefenseConfig = field(default_factory=lambda: _defense_config_class("sft")())
    eval: EvalConfig = field(default_factory=EvalConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    out_dir: str = "runs"
    run_id: str | None = None


# ----------------------------------------------------------------------------- building


def _defense_config_class(name: str) -> type[DefenseConfig]:
    # The registry (a ground-floor module) imports the defenses on first lookup: methods import config,
    # config never imports a method.
    from safeft.methods.registry import METHODS

    return METHODS.get(name).Config


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert) ``value`` against annotation ``tp``; raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error is the useful one
            return _coerce(value, options[0], where)
        for arg in options:
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in options)
        raise ConfigError(f"{where}: {value!r} is not a {names}")
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported config type {tp}")  # a bug in our schema, not user input


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _over_default(f: dataclasses.Field, value: Any) -> Any:
    """A partial section overrides the field's own default, not its class's: ``align.lora.r=8`` must keep
    AlignConfig's ``align.lora.alpha`` (64), where building LoraConfig from the keys given would reset it to
    LoraConfig's (32). Defense sections are built from their ``name`` and are left as given."""
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    if not dataclasses.is_dataclass(default) or isinstance(default, DefenseConfig):
        return value
    return _merged(to_dict(default), value)


def build(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, strictly. ``where`` is the dotted key path so far."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping, got {type(data).__name__}")
    if cls is DefenseConfig or (isinstance(cls, type) and issubclass(cls, DefenseConfig)):
        name = data.get("name", "sft")
        if not isinstance(name, str):
            raise ConfigError(f"{_key(where, 'name')}: expected a string, got {name!r}")
        try:
            cls = _defense_config_class(name)
        except KeyError as e:
            raise ConfigError(f"{_key(where, 'name')}: {e.args[0]}") from None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        hint = difflib.get_close_matches(str(k), list(fields), n=1)
        extra = f" (did you mean {_key(where, hint[0])!r}?)" if hint else ""
        raise ConfigError(f"unknown key {_key(where, str(k))!r}{extra}; valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(_over_default(f, data[name]), hints[name], _key(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required field {_key(where, name)!r}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


def _set_dotted(tree: dict, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: {key!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        # YAML gives us typed scalars: 3 -> int, 1e-4 -> str (coerced later), null -> None, [a,b] -> list
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"command line: cannot parse value of {key!r}: {e}") from None
        out.append((key.strip(), value))
    return out


def defense_from_spec(spec: str, where: str = "defense", extra: list[str] = ()) -> DefenseConfig:
    """``name[:key=value,...]`` -> that defense's config, e.g. ``saft+repanchor:pgd_mode=free,lam=0.3``: a method
    with options, as one string (the demo's ``demo.methods``, benchmarks). Values parse like dotted overrides;
    ``extra`` are more ``key=value`` options the caller adds (a path may hold a comma, a spec cannot)."""
    name, _, opts = spec.partition(":")
    pairs = [kv for kv in opts.split(",") if kv]
    bad = [kv for kv in pairs if "=" not in kv]
    if not name or bad:
        raise ConfigError(f"{where}: {spec!r} is not name[:key=value,...]" + (f" (bad: {bad})" if bad else ""))
    tree: dict[str, Any] = {"name": name.strip()}
    for key, value in parse_overrides([*pairs, *extra]):
        _set_dotted(tree, key, value, f"{where}: {spec!r}")
    return build(DefenseConfig, tree, where)


def load(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    cls: type = RunConfig,
    defense: str | None = None,
) -> Any:
    """Load a config: dataclass defaults <- YAML file <- ``defense`` <- dotted overrides.

    ``defense`` (the CLI's ``--defense NAME``) selects the method. When the file configures a different
    method, its defense section is dropped (those keys belong to the other method's config and would be
    rejected); when it names the same method, its settings are kept. Dotted ``defense.*`` overrides apply
    on top either way.
    """
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    if defense is not None:
        section = tree.get("defense")
        if not (isinstance(section, dict) and section.get("name") == defense):
            tree["defense"] = {"name": defense}
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value, "command line")
    cli = ["command line"] if overrides or defense is not None else []
    source = " + ".join(([str(path)] if path is not None else []) + cli)
    try:
        return build(cls, tree)
    except ConfigError as e:
        raise ConfigError(f"{source or 'config'}: {e}") from None


def save(cfg: Any, path: str | Path) -> None:
    from safeft import io  # the one atomic writer (io imports nothing of ours)

    io.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
