"""Where a model runs and in what form: the one placement rule and the memory levers.

**Placement.** ``default_device()`` is the single rule every verb follows (``eval``, ``diagnose``, ``align``'s
answer generation and training, ``train``, model judges): ``$SAFEFT_DEVICE`` when set (``cpu`` keeps a GPU
free, ``cuda:1`` picks one), else this process's CUDA device when there is one (``cuda:$LOCAL_RANK`` under a
multi-process launcher), else the CPU. Training gets the same answer through accelerate
(``safeft.context.make_accelerator`` asks for the CPU exactly when this rule says CPU). ``place(model)``
moves a model there; ``models.load(spec, **load_args(cfg.model))`` loads straight onto it.

**Memory levers** (``model.*`` in the config), what each changes and costs:

* ``dtype`` fp32 | bf16 | fp16: the dtype the weights are *stored* in, given to ``from_pretrained`` so a 70B
  model is never materialised in fp32 first. LoRA adapters stay fp32 (peft up-casts them), so half-precision
  weights under LoRA are the usual "frozen base in bf16" set-up. ``train.precision`` is separate: it picks
  the autocast of the compute. fp16 without LoRA is refused: AdamW's eps (1e-8) and squared gradients
  underflow in fp16 master weights, and no loss scaling is applied.
* ``gradient_checkpointing``: recompute each decoder block in the backward instead of storing its
  activations (~1/3 more compute, activation memory from O(layers) to O(1) blocks). Non-reentrant, so it
  composes with LoRA's frozen base and with several backward passes per step.
* ``attn_implementation`` sdpa | eager | flash_attention_2 (None = transformers' choice, sdpa where the
  model supports it). flash_attention_2 needs the ``flash-attn`` package and a CUDA GPU; it takes no
  custom 4-D mask, so anchor packing falls back to separate passes, loudly (``safeft.packing``).
* ``load_in_4bit``: QLoRA. The frozen base is quantised to NF4 by bitsandbytes at load (compute in bf16,
  or fp16 when ``dtype=fp16``); LoRA adapters train in fp32 on top. GPU only, LoRA only, and an extra:
  ``pip install 'safeft[qlora]'``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from torch import nn

from safeft.config import ConfigError, ModelConfig

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION = ("sdpa", "eager", "flash_attention_2")


def default_device() -> torch.device:
    """The device this process runs models on (see the module doc): the one placement rule."""
    forced = os.environ.get("SAFEFT_DEVICE", "").strip()
    if forced:
        try:
            return torch.device(forced)
        except RuntimeError as e:
            raise ConfigError(f"SAFEFT_DEVICE={forced!r} is not a device torch knows ({e})") from None
    if torch.cuda.is_available():
        # under torchrun / accelerate launch each process owns the GPU of its local rank
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def resolve(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` -> ``default_device()``; anything else as given."""
    if device is None or device == "auto":
        return default_device()
    return torch.device(device)


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None))


def place(model: nn.Module, device: str | torch.device | None = None) -> nn.Module:
    """Move ``model`` to ``device`` (default: the rule) and return it.

    The frozen reference copy that full fine-tuning keeps (``models.prepare_reference``) sits outside the
    module tree, where ``.to`` does not reach, so it moves along explicitly. A quantised model stays where
    ``from_pretrained`` put it (bitsandbytes weights cannot be moved with ``.to``).
    """
    dev = resolve(device)
    if is_quantized(model):
        return model
    model = model.to(dev)
    ref = getattr(model, "_safeft_reference", None)
    if isinstance(ref, nn.Module):
        ref.to(dev)
    return model


def check_levers(mc: ModelConfig) -> None:
    """Reject lever values that cannot work here, naming the key (before anything is loaded or written)."""
    if mc.dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {', '.join(DTYPES)}, not {mc.dtype!r}")
    if mc.attn_implementation is not None and mc.attn_implementation not in ATTENTION:
        raise ConfigError(
            f"model.attn_implementation must be one of {', '.join(ATTENTION)} or null, not {mc.attn_implementation!r}"
        )
    if mc.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                "model.attn_implementation=flash_attention_2 needs the flash-attn package (pip install flash-attn, "
                "CUDA only); use sdpa"
            )
        if not torch.cuda.is_available():
            raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA GPU and none is visible")
    if mc.dtype == "fp16" and not mc.lora.enabled:
        raise ConfigError(
            "model.dtype=fp16 needs LoRA (model.lora.enabled=true): full fine-tuning of fp16 weights underflows in "
            "AdamW without loss scaling; use model.dtype=bf16 or fp32"
        )
    if mc.load_in_4bit:
        if not mc.lora.enabled:
            raise ConfigError(
                "model.load_in_4bit=true trains LoRA adapters on a frozen 4-bit base; set model.lora.enabled=true"
            )
        if not torch.cuda.is_available():
            raise ConfigError(
                "model.load_in_4bit=true (QLoRA through bitsandbytes) needs a CUDA GPU and none is visible here; "
                "use model.dtype=bf16 to halve the weights' memory instead"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                "model.load_in_4bit=true needs bitsandbytes, the 'qlora' extra: pip install 'safeft[qlora]'"
            )


def load_args(mc: ModelConfig, device: str | torch.device | None = "auto") -> dict[str, Any]:
    """Keyword arguments for ``models.load`` that apply ``mc``'s levers and put the model on ``device``
    (``"auto"``: the rule; ``None``: leave it on the CPU, e.g. for accelerate to place)."""
    check_levers(mc)
    kw: dict[str, Any] = {"dtype": DTYPES[mc.dtype]}
    if mc.attn_implementation is not None:
        kw["attn_implementation"] = mc.attn_implementation
    dev = None if device is None else resolve(device)
    if mc.load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = torch.float16 if mc.dtype == "fp16" else torch.bfloat16
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kw["dtype"] = compute  # the dtype of what stays unquantised (norms, embeddings)
        # bitsandbytes quantises while loading onto the GPU; the weights are never moved afterwards
        kw["device_map"] = {"": str(dev if dev is not None and dev.type == "cuda" else default_device())}
    else:
        kw["device"] = dev
    return kw


def apply_levers(model: nn.Module, mc: ModelConfig, training: bool = False) -> nn.Module:
    """Bring an already-loaded model in line with ``mc`` (dtype, attention, checkpointing); idempotent.

    ``models.load(**load_args(mc))`` already did what must happen at load time; this covers models handed
    in (tests, the demo) and the training-only levers.
    """
    check_levers(mc)
    if mc.load_in_4bit and not is_quantized(model):
        raise ConfigError(
            "model.load_in_4bit=true applies when safeft loads the model (models.load), not to one passed in"
        )
    want = DTYPES[mc.dtype]
    if not is_quantized(model) and any(p.dtype != want for p in model.parameters() if p.is_floating_point()):
        model = model.to(want)
    attn = mc.attn_implementation
    if attn is not None and getattr(model.config, "_attn_implementation", None) != attn:
        model.set_attn_implementation(attn)
    if training and is_quantized(model):
        from peft import prepare_model_for_kbit_training

        # fp32 norms and input gradients for the frozen 4-bit base (peft's QLoRA recipe)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=mc.gradient_checkpointing)
    if training and mc.gradient_checkpointing:
        # non-reentrant: works with a frozen base (LoRA) and with several backward passes per step
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated on ``device`` since the last reset (CUDA only; None elsewhere)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None
