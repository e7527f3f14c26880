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
from collections.abc import Iterator
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


# Off only in benchmarks/gen_frozen.py, which measures what flagging frozen weights (_generate_hf_eval) and
# merging a LoRA model in its bf16 copy (_bf16_copy) save.
FLAG_FROZEN_WEIGHTS = True
MERGE_LORA = True


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
        the derived fields, the sampling knobs under greedy decoding (where they change nothing), and the batch
        size where vLLM schedules its own batches, so settings that decode alike hash alike. On the hf backend
        the batch size stays in: it decides the padded shapes, and on CPU 64 vs 128 changed 21-50 % of
        greedy completions' text and rates by 1-2 points (``benchmarks/gen_batch.py``, docs/results.md round 5)."""
        rec = self.record(tok)
        drop = {"dtype", "decoding"}
        if self.backend != "hf":
            drop.add("batch_size")
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
    # Frozen weights decode at half speed: a model whose weights do not require grad generated 100 prompts in
    # 16-19 s against 8 s for the same weights flagged, with the same completions (benchmarks/gen_frozen.py;
    # the time goes to aten::copy_, on CPU). Every model PEFT or a defense froze (fine-tuned LoRA models, which
    # every grid evaluates) paid it. Flagging records nothing under no_grad; the flags are restored below.
    frozen = [p for p in gen_model.parameters() if p.is_floating_point() and not p.requires_grad]
    frozen = frozen if FLAG_FROZEN_WEIGHTS else []
    for p in frozen:
        p.requires_grad_(True)
    try:
        for idx in _batches(order, [len(r.input_ids) for r in rows], settings.batch_size):
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
        for p in frozen:
            p.requires_grad_(False)
    return [g for g in out if g is not None]


# A batch pads to at most batch_size x this many prompt tokens. Every shipped suite of short prompts stays under it
# at batch 64 and 128 (at most 72 tokens a prompt), so their batches, and with them their completions, are those
# of the uncapped loop; long prompts (HarmBench's contextual behaviours, ~380 tokens, up to 1025) no longer pad
# 128 rows to the longest: 100 of them took 117 s in one batch of 128 and 45 s in batches of 32, on 2 CPU cores.
PADDED_TOKENS_PER_ROW = 128


def _batches(order: list[int], lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Consecutive runs of ``order`` (indices sorted by length, shortest first), each at most ``batch_size``
    long and padding to at most ``batch_size * PADDED_TOKENS_PER_ROW`` tokens; one prompt always fits."""
    budget = batch_size * PADDED_TOKENS_PER_ROW
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and end - start < batch_size and (end - start + 1) * lengths[order[end]] <= budget:
            end += 1
        yield order[start:end]
        start = end


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
    lora = MERGE_LORA and hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")  # models.is_lora
    if not lora and all(p.dtype == torch.bfloat16 for p in model.parameters()):
        return model
    gen = copy.deepcopy(model)
    if lora:
        # Merged in fp32 before the cast, as safeft.models.load merges a saved adapter: a LoRA model straight
        # from train() decodes like its run directory reloaded (`safeft eval runs/<id>`), and without the
        # adapter's extra products per layer (1.4x the time of the merged model on CPU, stop 26).
        gen = gen.merge_and_unload()
    return gen.to(torch.bfloat16)


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
    inputs. One engine per process serves every suite (``_VLLM``): a LoRA model is its base model's engine
    plus its adapter, written once and served through vLLM's ``LoRARequest``, so evaluating several runs
    of one base model loads the base once. A model without an adapter that is not a path (e.g. after full
    fine-tuning) is written out once per weights and loaded as its own engine.
    """
    vllm = _require_vllm()
    prec = P.pick(settings.precision)
    llm, lora = _VLLM.engine_for(vllm, model, tok, "bfloat16" if prec == "bf16" else "float32", settings.seed)
    params = vllm.SamplingParams(
        max_tokens=settings.max_new_tokens,
        temperature=settings.temperature if settings.do_sample else 0.0,  # 0 = greedy in vLLM
        top_p=settings.top_p if settings.do_sample else 1.0,
        top_k=(settings.top_k or -1) if settings.do_sample else -1,
        seed=settings.seed,
        stop_token_ids=_stop_ids(tok),
    )
    inputs = [{"prompt_token_ids": prompt_ids(tok, p, settings.system_prompt)} for p in prompts]
    outs = llm.generate(inputs, params, lora_request=lora)
    res = []
    for o in outs:
        c = o.outputs[0]
        finish = "stop" if c.finish_reason == "stop" else "length"
        res.append(Generation(tok.decode(c.token_ids, skip_special_tokens=True).strip(), len(c.token_ids), finish))
    return res


# vLLM takes LoRA ranks from this set; an engine is sized for the largest rank it will serve.
_VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def _weights_key(module: nn.Module, only: str = "") -> str:
    """A content key of a module's weights (names, shapes, fp64 sums) whose names contain ``only``: cheap
    next to generation, and it changes when training changes them, so an export is never served for others."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if only not in name:
                continue
            f = p.detach().double()
            h.update(f"{name}{tuple(p.shape)}{float(f.sum())!r}{float(f.square().sum())!r}".encode())
    return h.hexdigest()[:16]


class _VLLMCache:
    """The process's one vLLM engine and the exports it serves.

    One engine at a time: an engine reserves most of the GPU's memory, so a second base model replaces
    the first. The key is (model source, dtype, seed, LoRA rank the engine is sized for). Adapters are
    written once per content key into a directory that lives as long as the process.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.engine = None
        self.exports: dict[str, Path] = {}  # content key -> directory written
        self.lora_ids: dict[Path, int] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None

    def _dir(self, key: str) -> tuple[Path, bool]:
        """(the export directory for ``key``, whether it already exists)."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="safeft-vllm-")
        out = Path(self._tmp.name) / key
        return out, key in self.exports

    def source(self, model, tok) -> tuple[str, Path | None, int]:
        """(what vLLM loads as the engine's model, the adapter directory or None, the adapter's rank)."""
        if isinstance(model, str | Path):
            return str(model), None, 0
        if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
            base = model.get_base_model()
            where = getattr(base.config, "_name_or_path", "") or getattr(base, "name_or_path", "")
            if not where:
                raise GenerationError("vllm: the LoRA model does not say which base model it was loaded from")
            # The base stays as loaded (LoRA training freezes it; Safe LoRA rewrites B only): vLLM reads it
            # from where it was loaded, and only the adapter is written.
            key = "lora-" + _weights_key(model, only="lora_")
            out, done = self._dir(key)
            if not done:
                model.save_pretrained(out)  # the adapter only (adapter_config.json + weights)
                self.exports[key] = out
                log.info("vllm: wrote the LoRA adapter to %s", out)
            rank = max(int(c.r) for c in model.peft_config.values())
            return str(where), out, rank
        key = "full-" + _weights_key(model)
        out, done = self._dir(key)
        if not done:
            model.save_pretrained(out)
            tok.save_pretrained(out)
            self.exports[key] = out
            log.info("vllm: wrote the model to %s (once per weights)", out)
        return str(out), None, 0

    def engine_for(self, vllm, model, tok, dtype: str, seed: int):
        """(the engine, the LoRARequest for the model's adapter or None), building the engine if needed."""
        path, adapter, rank = self.source(model, tok)
        lora_rank = next((r for r in _VLLM_LORA_RANKS if r >= rank), None) if rank else 0
        if rank and lora_rank is None:
            raise GenerationError(f"vllm serves LoRA ranks up to {_VLLM_LORA_RANKS[-1]}; this adapter has r={rank}")
        key = (path, dtype, seed, lora_rank)
        if self.key != key:
            self.release_engine()
            kw: dict = {"model": path, "dtype": dtype, "seed": seed}
            if lora_rank:
                kw.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=1)
            if torch.cuda.is_available():
                # the caller's own model may sit on the GPU too: take only part of what is free now
                free, total = torch.cuda.mem_get_info()
                kw["gpu_memory_utilization"] = round(0.85 * free / total, 3)
            log.info("vllm: starting an engine for %s (%s, LoRA rank %s)", path, dtype, lora_rank or "none")
            self.engine, self.key = vllm.LLM(**kw), key
        if adapter is None:
            return self.engine, None
        from importlib import import_module

        lora_request = import_module("vllm.lora.request").LoRARequest
        ident = self.lora_ids.setdefault(adapter, len(self.lora_ids) + 1)  # vLLM wants ids >= 1
        return self.engine, lora_request(f"safeft-{ident}", ident, str(adapter))

    def release_engine(self) -> None:
        if self.engine is not None:
            self.engine, self.key = None, None
            import gc

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


_VLLM = _VLLMCache()


def release_vllm() -> None:
    """Free the process's vLLM engine (its GPU memory) and the adapters and models it wrote."""
    _VLLM.release_engine()
    if _VLLM._tmp is not None:
        _VLLM._tmp.cleanup()
    _VLLM.__init__()


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
