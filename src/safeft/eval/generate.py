"""Batched generation: left padding, KV cache, greedy by default, every setting recorded with each sample.

Prompts are rendered by the same chat renderer as training (``safeft.data.chat``). They are sorted by
length before batching so little compute goes into padding, and results come back in input order.

Safety numbers move with max_new_tokens, the chat template, the system prompt, sampling and even the
compute dtype, so ``GenSettings.record(tok)`` writes all of them (the template as a hash) into every
per-sample record. Two backends share the settings: ``hf`` (transformers ``generate``, CPU or GPU) and
``vllm`` (optional, CUDA only, behind an import guard; see ``_generate_vllm``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from safeft import precision as P
from safeft.data.chat import Rendered, collate, prompt_ids
from safeft.hooks import eval_mode

if TYPE_CHECKING:
    from safeft.config import EvalConfig

log = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm")


class GenerationError(RuntimeError):
    """Generation cannot run as configured (e.g. the vLLM backend without vllm or a GPU)."""


@dataclass(frozen=True)
class GenSettings:
    max_new_tokens: int = 64
    batch_size: int = 64  # prompts per generate call (hf backend); vLLM schedules its own batches
    do_sample: bool = False  # greedy unless True
    temperature: float = 1.0  # sampling only
    system_prompt: str | None = None
    precision: str = "auto"  # auto | fp32 | bf16; resolved before recording
    top_p: float = 1.0  # sampling only; 1.0 = off
    top_k: int = 0  # sampling only; 0 = off
    seed: int = 0  # sampling seed (the outputs of greedy decoding do not depend on it)
    backend: str = "hf"  # hf | vllm

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"generation backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1")
        P.pick(self.precision)  # validates

    @classmethod
    def from_eval(
        cls,
        ev: EvalConfig,
        system_prompt: str | None = None,
        *,
        max_new_tokens: int | None = None,
        batch_size: int | None = None,
        precision: str | None = None,
    ) -> GenSettings:
        """The generation settings of an ``eval:`` config section, for every verb that generates.

        ``safeft eval``, the ASR logged during training, diagnosis and alignment's benign answers all build
        their settings here, so one model decodes the same way (sampling, seed, backend, precision)
        whichever verb runs it. A caller with its own answer length, batch size or precision (alignment's
        answers are longer than an eval's refusals) passes it; every other setting comes from ``ev``.
        """
        s = cls(
            max_new_tokens=ev.max_new_tokens,
            batch_size=ev.batch_size,
            do_sample=ev.do_sample,
            temperature=ev.temperature,
            system_prompt=system_prompt,
            precision=ev.precision,
            top_p=ev.top_p,
            top_k=ev.top_k,
            seed=ev.seed,
            backend=ev.backend,
        )
        given = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "precision": precision}
        return replace(s, **{k: v for k, v in given.items() if v is not None})

    def identity(self, tok=None) -> dict:
        """The settings that decide the completions, for cache keys and settings hashes: ``record`` without
        the batch size (scheduling), the derived fields, and the sampling knobs under greedy decoding (where
        they change nothing), so settings that decode alike hash alike."""
        rec = self.record(tok)
        drop = {"batch_size", "dtype", "decoding"}
        if not self.do_sample:
            drop |= {"temperature", "top_p", "top_k", "seed"}
        return {k: v for k, v in rec.items() if k not in drop}

    def record(self, tok=None) -> dict:
        """Everything that can change a completion, as stored beside each sample."""
        prec = P.pick(self.precision)
        rec = {
            **asdict(self),
            "precision": prec,
            "dtype": "bfloat16" if prec == "bf16" else "float32",
            "decoding": "sample" if self.do_sample else "greedy",
        }
        if tok is not None:
            template = getattr(tok, "chat_template", None) or ""
            rec["chat_template_sha256"] = hashlib.sha256(template.encode()).hexdigest()[:16]
            rec["tokenizer"] = getattr(tok, "name_or_path", "") or ""
        return rec


@dataclass(frozen=True)
class Generation:
    text: str  # special tokens stripped, whitespace trimmed
    n_tokens: int  # new tokens produced, the stop token included
    finish: str  # "stop" (an end-of-turn token) or "length" (hit max_new_tokens)

    def record(self) -> dict:
        return {"n_new_tokens": self.n_tokens, "finish": self.finish}


def generate(
    model: nn.Module,
    tok,
    prompts: list[str],
    settings: GenSettings = GenSettings(),
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Completions for ``prompts`` (special tokens stripped), in input order."""
    return [g.text for g in generate_full(model, tok, prompts, settings, progress, desc)]


def generate_full(
    model: nn.Module | str | Path,
    tok,
    prompts: list[str],
    settings: GenSettings = GenSettings(),
    progress: bool = True,
    desc: str = "generate",
) -> list[Generation]:
    """Like ``generate`` but with token counts and finish reasons. ``model`` may be a path for vLLM."""
    if settings.backend == "vllm":
        return _generate_vllm(model, tok, prompts, settings)
    if not isinstance(model, nn.Module):
        raise GenerationError("the hf backend needs a loaded model (safeft.models.load), not a path")
    return _generate_hf(model, tok, prompts, settings, progress, desc)


def _generate_hf(model: nn.Module, tok, prompts, settings: GenSettings, progress: bool, desc: str):
    with eval_mode(model):  # before any copy is made: the bf16 copy inherits eval mode
        return _generate_hf_eval(model, tok, prompts, settings, progress, desc)


@torch.no_grad()
def _generate_hf_eval(model: nn.Module, tok, prompts, settings: GenSettings, progress: bool, desc: str):
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    precision = P.pick(settings.precision)
    # CPU: a bf16 copy (see _bf16_copy). CUDA: autocast, where re-casting is cheap and a copy is not.
    on_cpu = device.type == "cpu"
    gen_model = _bf16_copy(model) if precision == "bf16" and on_cpu else model
    amp = P.autocast(precision if not on_cpu else "fp32", device)
    rows = [Rendered(ids, ids, len(ids)) for ids in (prompt_ids(tok, p, settings.system_prompt) for p in prompts)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    out: list[Generation | None] = [None] * len(rows)
    stop = _stop_ids(tok)
    kw = _sampling_kwargs(settings)
    if settings.do_sample:
        torch.manual_seed(settings.seed)
    bar = tqdm(total=len(rows), desc=desc, unit="prompt", disable=not progress)
    produced = 0
    try:
        for start in range(0, len(order), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            batch = collate([rows[i] for i in idx], tok.pad_token_id, side="left")
            with amp:
                gen = gen_model.generate(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    max_new_tokens=settings.max_new_tokens,
                    eos_token_id=stop,
                    pad_token_id=tok.pad_token_id,
                    use_cache=True,
                    **kw,
                )
            new = gen[:, batch["input_ids"].shape[1] :].tolist()
            for i, seq in zip(idx, new, strict=True):
                out[i] = _finish(tok, seq, stop)
                produced += out[i].n_tokens
            bar.update(len(idx))
            bar.set_postfix(new_tokens=produced)
    finally:
        bar.close()
    return [g for g in out if g is not None]


def _sampling_kwargs(s: GenSettings) -> dict:
    # Explicit None/False overrides whatever a checkpoint's generation_config.json would otherwise add
    # (many chat models ship do_sample=True, temperature=0.6, top_p=0.9 there).
    if not s.do_sample:
        return dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    return dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None)


def _finish(tok, seq: list[int], stop: list[int]) -> Generation:
    # Everything after the first stop token is padding that generate() appends to finished rows.
    cut = next((j for j, t in enumerate(seq) if t in stop), None)
    kept = seq if cut is None else seq[:cut]
    return Generation(
        tok.decode(kept, skip_special_tokens=True).strip(),
        len(seq) if cut is None else cut + 1,
        "length" if cut is None else "stop",
    )


def _bf16_copy(model: nn.Module) -> nn.Module:
    """A bf16 copy for generation; the caller's (trained, fp32) weights are never rounded.

    Autocast would be the obvious choice, but it re-casts every frozen weight at every decode step (its
    cast cache only covers tensors that require grad), which costs ~20 % of generation time on CPU.
    """
    if all(p.dtype == torch.bfloat16 for p in model.parameters()):
        return model
    return copy.deepcopy(model).to(torch.bfloat16)


def _stop_ids(tok) -> list[int]:
    # End-of-turn tokens differ per template (<|im_end|>, <|eot_id|>, <end_of_turn>); stop on any we know.
    ids = {tok.eos_token_id}
    for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
        tid = tok.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None and tid >= 0:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


# ------------------------------------------------------------------------------------------------ vLLM


def _generate_vllm(model, tok, prompts: list[str], settings: GenSettings) -> list[Generation]:
    """Generation with vLLM (paged attention, continuous batching): much faster on a GPU, CUDA only.

    The prompts are passed as the same token ids the hf backend would use, so both backends see identical
    inputs. A loaded model (e.g. a LoRA run) is merged and written to a temporary directory first, since
    vLLM loads weights from disk. Not exercised by the CPU test suite beyond the guard below.
    """
    vllm = _require_vllm()
    prec = P.pick(settings.precision)
    with tempfile.TemporaryDirectory(prefix="safeft-vllm-") as tmp:
        path = Path(model) if isinstance(model, str | Path) else _export(model, tok, Path(tmp))
        llm = vllm.LLM(
            model=str(path), dtype="bfloat16" if prec == "bf16" else "float32", seed=settings.seed, enforce_eager=False
        )
        stop = _stop_ids(tok)
        params = vllm.SamplingParams(
            max_tokens=settings.max_new_tokens,
            temperature=settings.temperature if settings.do_sample else 0.0,  # 0 = greedy in vLLM
            top_p=settings.top_p if settings.do_sample else 1.0,
            top_k=(settings.top_k or -1) if settings.do_sample else -1,
            seed=settings.seed,
            stop_token_ids=stop,
        )
        inputs = [{"prompt_token_ids": prompt_ids(tok, p, settings.system_prompt)} for p in prompts]
        outs = llm.generate(inputs, params)
    res = []
    for o in outs:
        c = o.outputs[0]
        finish = "stop" if c.finish_reason == "stop" else "length"
        res.append(Generation(tok.decode(c.token_ids, skip_special_tokens=True).strip(), len(c.token_ids), finish))
    return res


def _require_vllm():
    try:
        import vllm  # noqa: PLC0415 - optional dependency, imported only when asked for
    except ImportError as e:
        raise GenerationError(
            "generation backend 'vllm' needs the vllm package (pip install vllm; Linux with a CUDA GPU). "
            "Use eval.backend=hf to generate with transformers instead."
        ) from e
    if not torch.cuda.is_available():
        raise GenerationError(
            "generation backend 'vllm' needs a CUDA GPU and none is visible here; use eval.backend=hf on CPU."
        )
    return vllm


def _export(model: nn.Module, tok, out: Path) -> Path:
    """Write ``model`` (LoRA adapters merged into a copy) and ``tok`` as an ordinary HF checkpoint."""
    m = copy.deepcopy(model)
    if hasattr(m, "merge_and_unload"):
        m = m.merge_and_unload()
    m.save_pretrained(out)
    tok.save_pretrained(out)
    log.info("vllm: exported the model to %s", out)
    return out
