"""Representation drift over training: per-layer CKA and next-token KL between each checkpoint and its reference.

For every saved checkpoint of a run (``runs/<id>/checkpoints/step-N``) and the run's starting model (the
aligned reference, ``model.spec`` in the run's ``config.yaml``), on two fixed probe sets reported
separately — ``harmful`` (HarmBench test prompts, never trained on) and ``benign`` (the run's task domain,
test split) — this measures (docs/diagnosis.md; CKA: Kornblith et al. 2019, Nguyen et al. 2021):

* per decoder block l (0-based), ``CKA_l = CKA(H_l^ref, H_l^ckpt)`` for three sample definitions:
  ``last`` (the last prompt token: the state that drives the first response token), ``mean`` (mean over the
  prompt's real tokens, pad and the first token excluded) and ``token`` (every such token a sample, exact
  streaming feature-space CKA). All in fp64 (``diagnose.cka``).
* ``KL(ref ‖ ckpt)`` of the next-token distribution at the last prompt token, averaged over prompts.
* ASR at the checkpoint when the run logged it (``evals.jsonl``, ``train.eval_every``), or computed here
  (``asr_prompts`` > 0) with the run's eval settings.

[inferred] choices, stated because they move the numbers:
* Tokens shared by every prompt of a probe set (the chat template's prefix, e.g. SmolLM2's default system
  prompt, ~30 tokens) are excluded from ``mean`` and ``token`` samples along with the first token: under
  causal attention their states are identical for every prompt, so they add copies of one point per position
  and, for short prompts, outnumber the prompt's own tokens (``keep_prefix=True`` keeps them).
* Step 0 (the reference itself) is included by construction: CKA 1, KL 0, and the run's step-0 ASR.
* Models run in eval mode, fp32, right-padded batches (a plain forward with left padding would shift
  positions); hidden states are block outputs, captured with ``safeft.hooks.capture``.

Cost per checkpoint: one forward of the reference and one of the checkpoint over both probe sets, plus the
CKA algebra (measured by ``benchmarks/cka_cost.py``). Results are cached per checkpoint under
``<run>/diagnose/steps/step-N.json``, so an interrupted diagnosis resumes and a finished one re-plots free.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safeft import config as C
from safeft import devices, io, models
from safeft.data.chat import Rendered, collate, last_prompt_index, render
from safeft.data.types import Example
from safeft.diagnose.cka import StreamingCKA, linear_cka
from safeft.hooks import capture, eval_mode
from safeft.stats import Rate

log = logging.getLogger(__name__)

SAMPLES = ("last", "mean", "token")
PROBES = ("harmful", "benign")


@dataclass
class DriftConfig:
    n_harmful: int = 64  # harmful probe prompts (HarmBench test subset, eval seed)
    n_benign: int = 64  # benign probe prompts (task domain test split)
    batch_size: int = 16
    keep_prefix: bool = False  # keep the template prefix shared by all prompts in mean/token samples
    asr_prompts: int = 0  # > 0: compute ASR at every checkpoint on this many harmful prompts when the run did not
    fp32_products: bool = False  # token-level CKA: fp32 chunk products (fp64 accumulators; ~2x cheaper on CPU)


# ----------------------------------------------------------------------------- probe sets


def probe_examples(cfg: C.RunConfig, dc: DriftConfig) -> dict[str, list[Example]]:
    """The harmful and benign probe prompts of a run: fixed, seeded, the same for every checkpoint and run."""
    from safeft.data.domains import load_domain, run_domain
    from safeft.data.splits import safety_splits
    from safeft.eval.suites import subset

    seed = cfg.eval.seed
    harmful = subset(safety_splits(seed=seed).test, dc.n_harmful, seed)
    task = cfg.data.task if cfg.data else ""
    if (domain := run_domain(cfg)) is not None:
        benign = subset(load_domain(domain, "test"), dc.n_benign, seed)
    elif task:
        from safeft.data.sources import load_source

        benign = load_source(task)[: dc.n_benign]
    else:
        raise C.ConfigError("diagnosis needs the run's data.task for the benign probe set")
    return {"harmful": [Example(e.id, e.prompt) for e in harmful], "benign": [Example(e.id, e.prompt) for e in benign]}


def shared_prefix_len(rows: list[Rendered]) -> int:
    """Length of the token prefix common to every row (at most the shortest row minus one)."""
    n = min(len(r.input_ids) for r in rows) - 1
    first = rows[0].input_ids
    for r in rows[1:]:
        k = 0
        while k < n and r.input_ids[k] == first[k]:
            k += 1
        n = k
    return n


def sample_mask(batch: dict[str, torch.Tensor], skip: int) -> torch.Tensor:
    """(B, T) bool: real tokens at positions >= max(1, skip) (never the first token, never pad)."""
    mask = batch["attention_mask"].bool().clone()
    mask[:, : max(1, skip)] = False
    return mask


# ----------------------------------------------------------------------------- one model pair


@dataclass
class PairResult:
    cka: dict[str, list[float]]  # sample definition -> per layer
    kl: float  # mean KL(ref || model) of the next-token distribution at the last prompt token
    n_prompts: int
    n_tokens: int  # token-level samples


class PairMeter:
    """Accumulates, batch by batch, everything needed for CKA (three sample definitions) and KL."""

    def __init__(self, layers: list[int], product_dtype: torch.dtype = torch.float64) -> None:
        self.layers = layers
        self.stream = {i: StreamingCKA(product_dtype) for i in layers}
        self.pooled: dict[str, dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]]] = {
            s: {i: ([], []) for i in layers} for s in ("last", "mean")
        }
        self.kl_sum, self.n = 0.0, 0

    def update(self, batch, mask, h_ref, h_mod, logits_ref, logits_mod) -> None:
        last = last_prompt_index(batch)
        rows = torch.arange(last.shape[0], device=last.device)
        w = mask.unsqueeze(-1).double()
        for i in self.layers:
            a, b = h_ref[i], h_mod[i]
            self.pooled["last"][i][0].append(a[rows, last].double().cpu())
            self.pooled["last"][i][1].append(b[rows, last].double().cpu())
            self.pooled["mean"][i][0].append(((a.double() * w).sum(1) / w.sum(1).clamp_min(1)).cpu())
            self.pooled["mean"][i][1].append(((b.double() * w).sum(1) / w.sum(1).clamp_min(1)).cpu())
            self.stream[i].update(a[mask], b[mask])
        lp_ref = torch.log_softmax(logits_ref[rows, last].double(), -1)
        lp_mod = torch.log_softmax(logits_mod[rows, last].double(), -1)
        self.kl_sum += float((lp_ref.exp() * (lp_ref - lp_mod)).sum())
        self.n += last.shape[0]

    def result(self) -> PairResult:
        cka = {
            s: [
                float(linear_cka(torch.cat(self.pooled[s][i][0]), torch.cat(self.pooled[s][i][1]))) for i in self.layers
            ]
            for s in ("last", "mean")
        }
        cka["token"] = [float(self.stream[i].value()) for i in self.layers]
        n_tokens = self.stream[self.layers[0]].n
        return PairResult({s: cka[s] for s in SAMPLES}, self.kl_sum / max(self.n, 1), self.n, n_tokens)


@torch.no_grad()
def compare_models(
    model: nn.Module,
    reference: nn.Module | Callable[[], contextlib.AbstractContextManager[nn.Module]],
    rows: list[Rendered],
    pad_id: int,
    layers: list[int] | None = None,
    batch_size: int = 16,
    keep_prefix: bool = False,
    progress: bool = False,
    desc: str = "cka",
    fp32_products: bool = False,
) -> PairResult:
    """CKA per layer (three sample definitions) and next-token KL between ``reference`` and ``model`` on ``rows``.

    ``reference`` is a module or a factory of context managers yielding one (``lambda: models.reference(model)``
    under LoRA: the same network with adapters disabled, entered per batch).
    """
    from tqdm.auto import tqdm

    layers = list(range(len(models.decoder_layers(model)))) if layers is None else layers
    skip = 1 if keep_prefix else shared_prefix_len(rows)
    meter = PairMeter(layers, torch.float32 if fp32_products else torch.float64)
    device = next(model.parameters()).device
    with eval_mode(model):
        for start in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress, leave=False):
            batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size], pad_id).items()}
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            with _enter(reference) as ref, eval_mode(ref):
                with capture(ref, layers, detach=True) as h:
                    logits_ref = ref(**inputs).logits
                h_ref = dict(h)
            with capture(model, layers, detach=True) as h:
                logits_mod = model(**inputs).logits
            meter.update(batch, sample_mask(batch, skip), h_ref, dict(h), logits_ref, logits_mod)
    return meter.result()


@contextlib.contextmanager
def _enter(reference) -> Iterator[nn.Module]:
    if isinstance(reference, nn.Module):
        yield reference
    else:
        with reference() as ref:
            yield ref


# ----------------------------------------------------------------------------- a run


@dataclass
class RunModels:
    """A run's model with one checkpoint loaded at a time, and its reference."""

    cfg: C.RunConfig
    model: nn.Module
    tok: Any
    ref_model: nn.Module | None  # None under LoRA (the reference is the adapter-disabled model)

    def reference(self):
        """A module, or a factory of the adapter-disabled context (``compare_models`` enters it per batch)."""
        return (lambda: models.reference(self.model)) if self.ref_model is None else self.ref_model

    def load(self, ckpt: Path) -> None:
        from safeft.runs import load_trainable

        load_trainable(self.model, ckpt)
        self.model.eval()


def open_run(run_dir: Path) -> RunModels:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise C.ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = C.load(run_dir / "config.yaml")
    model, tok = models.load(cfg.model.spec, **devices.load_args(cfg.model))
    ref = None
    if not cfg.model.lora.enabled:
        ref, _ = models.load(cfg.model.spec, **devices.load_args(cfg.model))
        ref.eval()
    model = models.attach_lora(model, cfg.model.lora)
    return RunModels(cfg, model, tok, ref)


def logged_asr(run_dir: Path) -> dict[int, dict[str, Any]]:
    """step -> the ASR line the run logged with ``train.eval_every`` (empty if it did not)."""
    from safeft.runs import read_log

    # the run's own reader: a torn last line (a killed run) is dropped with a warning, a damaged one before
    # it is an error naming the line
    return {rec["step"]: rec for rec in read_log(Path(run_dir) / "evals.jsonl")}


def _asr_now(rm: RunModels, examples: list[Example], reference: bool) -> dict[str, Any]:
    from safeft.eval.generate import GenSettings
    from safeft.eval.suites import harmful

    ev = rm.cfg.eval
    settings = GenSettings.from_eval(ev, system_prompt=rm.cfg.model.system_prompt)
    if not reference:
        return harmful(rm.model, rm.tok, examples, settings, ev.judge, None)
    if rm.ref_model is not None:
        return harmful(rm.ref_model, rm.tok, examples, settings, ev.judge, None)
    with rm.model.disable_adapter():
        return harmful(rm.model, rm.tok, examples, settings, ev.judge, None)


def diagnose_run(run_dir: Path, dc: DriftConfig = DriftConfig(), progress: bool = True) -> dict[str, Any]:
    """Drift of every checkpoint of ``run_dir``; cached per step under ``<run>/diagnose/steps``. Returns
    ``{"run", "layers", "steps": [{step, asr, probes: {harmful|benign: {cka: {sample: [..]}, kl, ...}}}]}``.

    The model is loaded only if some checkpoint (or a requested ASR) is not cached yet, so re-plotting a
    diagnosed run costs no forward pass."""
    from tqdm.auto import tqdm

    from safeft.runs import iter_checkpoints

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise C.ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    ckpts = list(iter_checkpoints(run_dir))
    if not ckpts:
        raise C.ConfigError(f"{run_dir}: no complete checkpoint to diagnose (train with train.save_every=N)")
    cfg = C.load(run_dir / "config.yaml")
    examples = probe_examples(cfg, dc)
    asr_items = examples["harmful"][: dc.asr_prompts]
    if dc.asr_prompts > len(examples["harmful"]):
        from safeft.data.splits import safety_splits
        from safeft.eval.suites import subset

        asr_items = subset(safety_splits(seed=cfg.eval.seed).test, dc.asr_prompts, cfg.eval.seed)
    logged = logged_asr(run_dir)
    cache = run_dir / "diagnose" / "steps"
    cache.mkdir(parents=True, exist_ok=True)
    # what the numbers depend on (not batch size or the ASR request): a cached step with the same key is reused
    key = {"n_harmful": dc.n_harmful, "n_benign": dc.n_benign, "keep_prefix": dc.keep_prefix}
    key["fp32_products"] = dc.fp32_products
    state: dict[str, Any] = {}

    def run_models() -> tuple[RunModels, dict[str, list[Rendered]]]:
        if "rm" not in state:  # loaded on first need only
            rm = open_run(run_dir)
            max_len = rm.cfg.data.max_length if rm.cfg.data else None
            state["rm"] = rm
            state["rows"] = {
                p: [render(rm.tok, ex, rm.cfg.model.system_prompt, max_len) for ex in examples[p]] for p in PROBES
            }
        return state["rm"], state["rows"]

    def want_asr(rec: dict[str, Any]) -> bool:
        return (
            bool(dc.asr_prompts)
            and rec["step"] not in logged
            and (rec.get("asr_computed") or {}).get("n") != len(asr_items)
        )

    steps: list[dict[str, Any]] = []
    for step, ckpt in tqdm(ckpts, desc=f"diagnose {run_dir.name}", disable=not progress):
        path = cache / f"step-{step:06d}.json"
        rec = json.loads(path.read_text()) if path.exists() else None
        if rec is None or any(rec.get("settings", {}).get(k) != v for k, v in key.items()):
            rm, rows = run_models()
            rm.load(ckpt)
            rec = {"step": step, "settings": key, "probes": {}}
            for p in PROBES:
                res = compare_models(
                    rm.model,
                    rm.reference(),
                    rows[p],
                    rm.tok.pad_token_id,
                    batch_size=dc.batch_size,
                    keep_prefix=dc.keep_prefix,
                    fp32_products=dc.fp32_products,
                    progress=progress,
                    desc=f"step {step} {p}",
                )
                rec["probes"][p] = asdict(res)
            io.write_json(path, rec, indent=None)
        if want_asr(rec):
            rm, _ = run_models()
            rm.load(ckpt)
            rec["asr_computed"] = _asr_now(rm, asr_items, reference=False)
            io.write_json(path, rec, indent=None)
        steps.append(rec)
    n_layers = len(steps[0]["probes"]["harmful"]["cka"]["mean"])
    ones = {s: [1.0] * n_layers for s in SAMPLES}
    step0: dict[str, Any] = {
        "step": 0,
        "probes": {p: {"cka": ones, "kl": 0.0, "n_prompts": len(examples[p]), "by_construction": True} for p in PROBES},
    }
    path0 = cache / "step-000000-asr.json"
    if path0.exists():
        step0["asr_computed"] = json.loads(path0.read_text())
    if want_asr(step0):
        step0["asr_computed"] = _asr_now(run_models()[0], asr_items, reference=True)
        io.write_json(path0, step0["asr_computed"], indent=None)
    steps.insert(0, step0)
    for rec in steps:
        src = logged.get(rec["step"]) or (rec.get("asr_computed") if dc.asr_prompts else None)
        rec["asr"] = None if src is None else src["asr"]
        rec["asr_n"] = None if src is None else src["n"]
        # 20 prompts per checkpoint is the default: the interval says how far apart two points must be to differ
        rec["asr_ci"] = None if src is None else list(Rate.of(src["asr"], src["n"]).ci)
    settings = {**asdict(dc), "layers": n_layers}
    return {"run": str(run_dir), "name": run_dir.name, "layers": n_layers, "config": settings, "steps": steps}
