"""Every check a run's inputs get, in one place, before anything is written or a weight is loaded.

``check(cfg)`` is the first thing ``safeft.train.train`` does and the whole of ``safeft validate``, so the
two agree by construction: whatever ``validate`` accepts, ``train`` gets past its start; whatever ``train``
refuses at its start, ``validate`` refuses with the same message. A bad value is reported with its dotted
key, the allowed range and the value it had, before minutes of model loading and setup.

In order, cheapest first:

1. values: ranges of every ``train``/``model.lora``/``data``/``eval`` number, names of enums, ``run_id``;
2. the defense's own config (``methods.build``);
3. the model spec, from its files only (config, tokenizer, header of a GGUF; never the weights):
   a path that does not exist, a directory without tokenizer files or without safetensors weights,
   ``data.max_length`` beyond the model's context, ``defense.layers`` beyond its depth, LoRA targets
   that match no module;
4. the task data: an unknown source, an empty file, ``n_train``, rows without a response;
5. the defense's aux data and its changes to the task rows, then every row rendered with the model's
   chat template (a prompt as long as ``data.max_length`` is refused).

Run-directory state (another process holding it, a finished run, changed data on resume) is not an
input and is checked by ``safeft.runs`` when ``train`` opens the directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from safeft import config as C
from safeft import methods, models
from safeft import precision as P
from safeft.data.types import DataError, Example

SCHEDULES = ("constant", "linear", "cosine")
BACKENDS = ("hf", "vllm")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
HUB_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def _need(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise C.ConfigError(f"{key}={value!r}: must be {allowed}")


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


# ----------------------------------------------------------------------------- 1. values


def check_values(cfg: C.RunConfig) -> None:
    """Ranges and names of every plain value; no file is touched."""
    t = cfg.train
    for key in ("steps", "batch_size", "grad_accum", "log_every", "eval_n_harmful"):
        _need(getattr(t, key) >= 1, f"train.{key}", "an integer >= 1", getattr(t, key))
    for key in ("save_every", "eval_every"):
        _need(getattr(t, key) >= 0, f"train.{key}", "an integer >= 0 (0 = off)", getattr(t, key))
    _need(_finite(t.lr) and t.lr > 0, "train.lr", "a finite number > 0", t.lr)
    _need(_finite(t.warmup_ratio) and 0 <= t.warmup_ratio <= 1, "train.warmup_ratio", "in [0, 1]", t.warmup_ratio)
    _need(_finite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay", "a finite number >= 0", t.weight_decay)
    if t.max_grad_norm is not None:
        _need(_finite(t.max_grad_norm) and t.max_grad_norm > 0, "train.max_grad_norm", "> 0 or null", t.max_grad_norm)
    _need(t.schedule in SCHEDULES, "train.schedule", f"one of {', '.join(SCHEDULES)}", t.schedule)
    _need(t.precision in P.PRECISIONS, "train.precision", f"one of {', '.join(P.PRECISIONS)}", t.precision)
    _need(0 <= t.seed < 2**32, "train.seed", "in [0, 2**32)", t.seed)  # numpy refuses other seeds

    lo = cfg.model.lora
    if lo.enabled:
        _need(lo.r >= 1, "model.lora.r", "an integer >= 1", lo.r)
        _need(lo.alpha > 0, "model.lora.alpha", "> 0", lo.alpha)
        _need(_finite(lo.dropout) and 0 <= lo.dropout < 1, "model.lora.dropout", "in [0, 1)", lo.dropout)
        targets = [lo.targets] if isinstance(lo.targets, str) else lo.targets
        ok = bool(targets) and all(isinstance(x, str) and x.strip() for x in targets)
        _need(ok, "model.lora.targets", "'all-linear', a regex, or a non-empty list of module names", lo.targets)
    _need(bool(cfg.model.spec.strip()), "model.spec", "a hub id, a directory, a .gguf file or an alias", cfg.model.spec)

    if cfg.data is not None:
        d = cfg.data
        _need(bool(d.task.strip()), "data.task", "a data source spec such as domain:finance or jsonl:<path>", d.task)
        if d.n_train is not None:
            _need(d.n_train >= 1, "data.n_train", "an integer >= 1, or null for every row", d.n_train)
        _need(d.max_length >= 2, "data.max_length", "an integer >= 2", d.max_length)

    e = cfg.eval
    _need(e.precision in P.PRECISIONS, "eval.precision", f"one of {', '.join(P.PRECISIONS)}", e.precision)
    _need(e.backend in BACKENDS, "eval.backend", f"one of {', '.join(BACKENDS)}", e.backend)
    for key in ("batch_size", "max_new_tokens", "humaneval_max_new_tokens"):
        _need(getattr(e, key) >= 1, f"eval.{key}", "an integer >= 1", getattr(e, key))
    for key in ("n_harmful", "n_over_refusal", "n_utility"):
        v = getattr(e, key)
        _need(v is None or v >= 1, f"eval.{key}", "an integer >= 1, or null for all", v)
    _need(_finite(e.temperature) and e.temperature > 0, "eval.temperature", "a finite number > 0", e.temperature)
    _need(_finite(e.top_p) and 0 < e.top_p <= 1, "eval.top_p", "in (0, 1]", e.top_p)
    _need(e.top_k >= 0, "eval.top_k", "an integer >= 0 (0 = off)", e.top_k)
    if t.eval_every > 0:  # the loop evaluates: its judge and prompt count must work
        from safeft.eval import judges

        judges.get(e.judge)
        n = e.n_harmful if e.n_harmful is not None else 200
        _need(t.eval_n_harmful <= n, "train.eval_n_harmful", f"<= eval.n_harmful ({n})", t.eval_n_harmful)

    if cfg.run_id is not None:
        rid = cfg.run_id
        ok = bool(rid.strip()) and rid not in (".", "..") and not any(c in rid for c in "/\\\0")
        _need(ok, "run_id", "a plain directory name (no '/', not '.' or '..')", rid)
    _need(bool(cfg.out_dir.strip()), "out_dir", "a directory path", cfg.out_dir)
    out = Path(cfg.out_dir).expanduser()
    _need(not out.exists() or out.is_dir(), "out_dir", "a directory (it is a file)", cfg.out_dir)


# ----------------------------------------------------------------------------- 3. the model, without weights


@dataclass
class ModelInfo:
    """What the checks need of a model: depth, context, module names, tokenizer. No weights are read."""

    spec: str
    where: str  # the directory, .gguf file or hub id the spec resolves to
    n_layers: int | None = None
    context: int | None = None
    gguf: Path | None = None
    _model: nn.Module | None = None
    _tokenizer: Any = None
    _hf_config: Any = None
    _meta: nn.Module | None = field(default=None, repr=False)

    def hf_config(self):
        if self._hf_config is None:
            from transformers import AutoConfig

            try:
                if self.gguf is not None:
                    self._hf_config = AutoConfig.from_pretrained(str(self.gguf.parent), gguf_file=self.gguf.name)
                else:
                    self._hf_config = AutoConfig.from_pretrained(self.where)
            except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a bad config
                raise models.ModelError(
                    f"model.spec={self.spec!r}: cannot read its config ({_first_line(e)})"
                ) from None
        return self._hf_config

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                if self.gguf is not None:
                    tok = AutoTokenizer.from_pretrained(str(self.gguf.parent), gguf_file=self.gguf.name)
                else:
                    tok = AutoTokenizer.from_pretrained(self.where)
            except Exception as e:
                raise models.ModelError(
                    f"model.spec={self.spec!r}: cannot load its tokenizer ({_first_line(e)})"
                ) from None
            try:
                models.prepare_tokenizer(tok)
            except models.ModelError as e:
                raise models.ModelError(f"model.spec={self.spec!r}: {e}") from None
            self._tokenizer = tok
        return self._tokenizer

    def modules(self) -> nn.Module:
        """The model itself when given, else its skeleton on the meta device (no memory, no weights)."""
        if self._model is not None:
            return self._model
        if self._meta is None:
            import torch
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                self._meta = AutoModelForCausalLM.from_config(self.hf_config())
        return self._meta


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _depth_and_context(hf_config) -> tuple[int | None, int | None]:
    cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    depth = next((getattr(cfg, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(cfg, k)), None)
    keys = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
    ctx = next((getattr(cfg, k) for k in keys if isinstance(getattr(cfg, k, None), int)), None)
    return depth, ctx


def looks_like_path(spec: str) -> bool:
    """A spec meant as a local path: starts with . / ~, has a backslash or more than one '/', names a
    weights file, or its first part is a local directory ("runs/x" when ./runs exists). A hub id is
    ``name`` or ``org/name``; taking a mistyped path for one would send it to the network."""
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.endswith("/"):
        return True
    if Path(spec).suffix in (".gguf", ".safetensors", *models.PICKLE_SUFFIXES):
        return True
    parts = spec.split("/")
    if len(parts) > 2 or not all(HUB_PART.fullmatch(p) for p in parts):
        return True
    return len(parts) == 2 and Path(parts[0]).is_dir()


def local_lookalike(spec: str) -> str | None:
    """A local model directory or .gguf file whose path is a near miss of ``spec`` (a typo), if any."""
    import difflib

    path = Path(spec).expanduser()
    parent = path.parent if str(path.parent) not in ("", ".") else Path(".")
    try:
        entries = [p for p in parent.iterdir() if (p / "config.json").is_file() or p.suffix == ".gguf"]
    except OSError:
        return None
    names = {p.name: p for p in entries}
    hit = difflib.get_close_matches(path.name, list(names), n=1, cutoff=0.8)
    return str(names[hit[0]]) if hit else None


def _gguf_info(info: ModelInfo) -> None:
    """Depth and context from the GGUF header; a converted copy in the cache is used as a directory."""
    converted = models.cache_dir() / "models" / f"{info.gguf.stem}-{models._file_digest(info.gguf)}"
    if (converted / "config.json").exists():  # what models.load will read: check that
        info.where, info.gguf = str(converted), None
        _dir_info(info, converted, allow_pickle=False)
        return
    meta = gguf_metadata(info.gguf)
    arch = meta.get("general.architecture")
    info.n_layers = meta.get(f"{arch}.block_count")
    info.context = meta.get(f"{arch}.context_length")


def _dir_info(info: ModelInfo, path: Path, allow_pickle: bool) -> None:
    spec = info.spec
    if not (path / "config.json").is_file():
        raise models.ModelError(f"model.spec={spec!r}: {path} holds no config.json, so it is not a model directory")
    pickles = [p for p in path.iterdir() if p.suffix in models.PICKLE_SUFFIXES]
    if not any(path.glob("*.safetensors")) and not pickles:
        raise models.ModelError(f"model.spec={spec!r}: {path} holds no weights (*.safetensors)")
    models.refuse_pickle_weights(path, allow_pickle)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise models.ModelError(
            f"model.spec={spec!r}: {path} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the "
            "tokenizer of the model it was made from into it"
        )
    try:
        json.loads((path / "config.json").read_text())
    except (ValueError, OSError) as e:
        raise models.ModelError(f"model.spec={spec!r}: {path / 'config.json'} is not valid JSON ({e})") from None
    info.n_layers, info.context = _depth_and_context(info.hf_config())


def _base_spec(path: Path) -> str | None:
    """The base model spec of a PEFT adapter directory or a safeft run directory; None for a model directory."""
    if (path / "adapter_config.json").is_file():
        try:
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (ValueError, OSError, AttributeError) as e:
            raise models.ModelError(f"{path / 'adapter_config.json'}: cannot read the adapter config ({e})") from None
        if not isinstance(base, str) or not base:
            raise models.ModelError(f"{path / 'adapter_config.json'}: no base_model_name_or_path")
        return base
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        try:
            return C.load(path / "config.yaml").model.spec
        except C.ConfigError as e:
            raise models.ModelError(f"{path}: a run directory whose config cannot be read ({e})") from None
    return None


def inspect_model(mc: C.ModelConfig, model: nn.Module | None = None, tokenizer: Any = None) -> ModelInfo:
    """Resolve ``mc.spec`` and read what the checks need, from files only. A given model is used as is."""
    spec = mc.spec
    if model is not None:
        info = ModelInfo(spec, "<the model passed in>", _model=model, _tokenizer=tokenizer)
        info.n_layers = len(models.decoder_layers(model))
        info.context = _depth_and_context(model.config)[1] if hasattr(model, "config") else None
        if tokenizer is None:
            raise C.ConfigError("train(model=...) needs its tokenizer too (tokenizer=...)")
        return info
    if spec in models.ALIASES:
        info = ModelInfo(spec, spec, gguf=models.alias_path(spec))
        _gguf_info(info)
        return info
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise models.ModelError(f"model.spec={spec!r}: GGUF file not found")
        info = ModelInfo(spec, str(path), gguf=path)
        _gguf_info(info)
        return info
    if path.exists():
        if not path.is_dir():
            raise models.ModelError(f"model.spec={spec!r}: {path} is a file, not a model directory or .gguf")
        base = _base_spec(path)
        if base is not None:  # a PEFT adapter or a run directory: its shape is its base model's
            if Path(base).expanduser().resolve() == path.resolve():
                raise models.ModelError(f"model.spec={spec!r}: {path} names itself as its base model")
            info = inspect_model(dataclasses.replace(mc, spec=base))
            info.spec = spec
            return info
        info = ModelInfo(spec, str(path))
        _dir_info(info, path, mc.allow_pickle)
        return info
    if looks_like_path(spec):
        raise models.ModelError(
            f"model.spec={spec!r}: no such file or directory (it looks like a local path, so it is not "
            "tried as a hub id; a hub id is name or org/name)"
        )
    near = local_lookalike(spec)
    if near is not None:
        raise models.ModelError(
            f"model.spec={spec!r}: no such file or directory; did you mean {near!r}, a model here? (a name "
            "that resembles a local model is not sent to the hub; rename, or use org/name for a hub model)"
        )
    info = ModelInfo(spec, spec)  # a hub id: its config comes from the hub (or the local HF cache)
    info.n_layers, info.context = _depth_and_context(info.hf_config())
    return info


def gguf_metadata(path: Path, wanted: tuple[str, ...] = ("block_count", "context_length")) -> dict[str, Any]:
    """The scalar key/values of a GGUF header, read until ``general.architecture`` and every ``*.<wanted>``
    key are found (they come before the tokenizer arrays). A header we cannot read gives what was found."""
    scalars = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    out: dict[str, Any] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF" or struct.unpack_from("<I", m, 4)[0] < 2:
            return out
        n_kv = struct.unpack_from("<Q", m, 16)[0]
        pos = 24

        def string(p: int) -> tuple[str, int]:
            n = struct.unpack_from("<Q", m, p)[0]
            return m[p + 8 : p + 8 + n].decode("utf-8", "replace"), p + 8 + n

        def value(kind: int, p: int) -> tuple[Any, int]:
            if kind in scalars:
                fmt = scalars[kind]
                return struct.unpack_from(fmt, m, p)[0], p + struct.calcsize(fmt)
            if kind == 8:
                return string(p)
            if kind == 9:  # array: skipped (only its end matters)
                item, n = struct.unpack_from("<IQ", m, p)
                p += 12
                if item in scalars:
                    return None, p + n * struct.calcsize(scalars[item])
                for _ in range(n):
                    _, p = value(item, p)
                return None, p
            raise ValueError(f"unknown GGUF value type {kind}")

        try:
            for _ in range(n_kv):
                key, pos = string(pos)
                kind = struct.unpack_from("<I", m, pos)[0]
                val, pos = value(kind, pos + 4)
                if val is not None:
                    out[key] = val
                arch = out.get("general.architecture")
                if arch and all(f"{arch}.{w}" in out for w in wanted):
                    break
        except (struct.error, ValueError):
            pass
    return out


def check_model_fit(cfg: C.RunConfig, info: ModelInfo) -> None:
    """The config against the model: context, depth, LoRA targets."""
    where = f"{cfg.model.spec}"
    if cfg.data is not None and info.context is not None:
        _need(
            cfg.data.max_length <= info.context,
            "data.max_length",
            f"<= the model's context ({info.context} positions, {where})",
            cfg.data.max_length,
        )
    layers = getattr(cfg.defense, "layers", None)
    if layers is not None and info.n_layers is not None:
        n = info.n_layers
        bad = [j for j in layers if not 0 <= j < n]
        _need(
            not bad, "defense.layers", f"decoder indices in 0..{n - 1} ({where} has {n} layers; {bad} are not)", layers
        )
    lo = cfg.model.lora
    if lo.enabled and lo.targets != "all-linear":
        _check_lora_targets(lo, info)


def _check_lora_targets(lo: C.LoraConfig, info: ModelInfo) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers.pytorch_utils import Conv1D

    supported = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)
    pc = PeftLoraConfig(r=lo.r, lora_alpha=lo.alpha, target_modules=lo.targets, task_type="CAUSAL_LM")
    named = [(n, m) for n, m in info.modules().named_modules() if n]
    matched = [(n, m) for n, m in named if check_target_module_exists(pc, n)]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in named if isinstance(m, nn.Linear)})
    if not matched:
        raise C.ConfigError(
            f"model.lora.targets={lo.targets!r}: must name modules of the model; it matches none of "
            f"{info.spec} (its linear layers: {', '.join(linear[:12])}; or 'all-linear')"
        )
    bad = [(n, m) for n, m in matched if not isinstance(m, supported)]
    if bad:
        n, m = bad[0]
        raise C.ConfigError(
            f"model.lora.targets={lo.targets!r}: must name linear, embedding or conv layers; it matches {n} "
            f"({type(m).__name__}); linear layers here: {', '.join(linear[:12])}"
        )


# ----------------------------------------------------------------------------- 4-5. the data


def load_task_examples(cfg: C.RunConfig, examples: list[Example] | None = None) -> list[Example]:
    """The task rows: ``examples`` when given, else ``data.task`` read with ``data.columns``; cut to
    ``n_train``; every row answered; then ``data.poison`` of them replaced by harmful pairs."""
    from safeft.data.sources import load_source
    from safeft.threats.poison import check_fraction, poison

    if examples is not None:
        rows, what = list(examples), "the examples passed to train"
    elif cfg.data is None:
        raise C.ConfigError("data.task: training needs data (e.g. data.task=domain:finance)")
    else:
        what = cfg.data.task
        try:
            rows = load_source(cfg.data.task, **({"columns": cfg.data.columns} if cfg.data.columns else {}))
        except KeyError as e:  # an unknown source name, with its did-you-mean
            raise C.ConfigError(f"data.task={cfg.data.task!r}: {e.args[0] if e.args else e}") from None
    if not rows:
        raise DataError(f"{what}: no rows to train on (an empty file?)")
    if cfg.data is not None and cfg.data.n_train is not None:
        if cfg.data.n_train > len(rows):
            raise C.ConfigError(f"data.n_train={cfg.data.n_train} but {what} has {len(rows)} rows")
        rows = rows[: cfg.data.n_train]
    missing = [ex for ex in rows if ex.response is None]
    if missing:
        where = getattr(missing[0], "location", "") or missing[0].id
        raise C.ConfigError(f"{what}: {len(missing)} rows have no response (first: {where})")
    empty = [ex.id for ex in rows if not ex.response.strip()]
    if empty:
        raise DataError(f"{what}: {len(empty)} rows have an empty response (first: row {empty[0]!r})")
    if cfg.data is not None:
        check_fraction(cfg.data.poison)
        if cfg.data.poison > 0:
            harmful = load_source(cfg.data.poison_source)
            rows = poison(rows, harmful, cfg.data.poison, cfg.data.seed, where=cfg.data.poison_source)
    return rows


def render_all(cfg: C.RunConfig, examples: list[Example], tokenizer) -> list:
    """Every row through the chat template (``data.chat_template`` installed first), as the loop will; a row
    that cannot be rendered is named, and more rows cut at max_length than ``data.max_truncated`` allows stop."""
    from safeft.data.chat import render, render_task, use_chat_template

    what = cfg.data.task if cfg.data else "data"
    try:
        if cfg.data is None:
            return [render(tokenizer, ex, cfg.model.system_prompt) for ex in examples]
        use_chat_template(tokenizer, cfg.data.chat_template)
        rows, _ = render_task(tokenizer, examples, cfg.model.system_prompt, cfg.data.max_length, cfg.data.max_truncated)
        return rows
    except DataError as e:
        raise DataError(f"{what}: {str(e).replace(' max_length=', ' data.max_length=')}") from None


# ----------------------------------------------------------------------------- all of it


@dataclass
class Checked:
    """What ``check`` built on its way, for ``train`` to use instead of building it again."""

    defense: Any  # the built Defense
    examples: list[Example]  # the task rows the run trains on (after the defense's own changes)
    aux: dict[str, list[Example]]
    model: ModelInfo
    fingerprint: tuple[str, int]  # hash of the task rows and their number (safeft.runs.fingerprint)


def _check_run_settings(cfg: C.RunConfig, defense) -> None:
    """The memory levers, and what the defense says it cannot run under, as far as the config and the launch
    environment tell before an accelerator exists (train checks the engine itself again once it has one)."""
    import os

    from safeft import devices
    from safeft.context import check_supported

    devices.check_levers(cfg.model)
    features = ["gradient_checkpointing"] if cfg.model.gradient_checkpointing else []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        features.append("processes")
    check_supported(defense, features)


def check(
    cfg: C.RunConfig,
    *,
    examples: list[Example] | None = None,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    aux: dict[str, list[Example]] | None = None,
) -> Checked:
    """Run every check ``train`` needs passed before it writes or loads anything; raise on the first
    failure (``ConfigError``, ``DataError``, ``ModelError``) with the key or file, the range and the value."""
    from safeft.data.aux import SERVICES, build_aux
    from safeft.runs import fingerprint

    check_values(cfg)
    from safeft import trackers

    trackers.check(cfg)
    defense = methods.build(cfg.defense)
    _check_run_settings(cfg, defense)
    info = inspect_model(cfg.model, model, tokenizer)
    check_model_fit(cfg, info)
    rows = load_task_examples(cfg, examples)
    aux = dict(aux or {})
    aux.update(build_aux([n for n in defense.needs if n not in aux and n not in SERVICES], seed=cfg.train.seed))
    # A defense may change the task data itself (safety-data mixing); its rows are checked like the user's.
    rows = defense.task_examples(rows, aux)
    render_all(cfg, rows, info.tokenizer())
    return Checked(defense, rows, aux, info, fingerprint(rows))
