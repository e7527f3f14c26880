"""GPU check: safeft's training loop, defenses, generation and memory levers on real model shapes, no downloads.

A device machine cannot download weights, so the models are built from configs with random weights, straight
on the device: a Llama-3.2-1B shape and a Llama-3-8B shape (``transformers.LlamaConfig``; random weights cost
the same as trained ones). The tokenizer is the tiny test tokenizer (``safeft.testing``): its ids are valid
in any vocabulary, and every figure is per token it produced. What it measures, each through the code users
run (``safeft.train.train``, ``safeft.eval.generate``):

1. SFT (LoRA r=16, bf16 weights on a GPU) step time and tokens/s on each shape (task tokens and all positions).
2. SBR and SAFT+RepAnchor step time as a ratio to SFT (1B shape), SFT measured before and after them.
3. HF ``generate`` tokens/s at batch 1 and batch 64 (greedy, KV cache, fixed number of new tokens).
4. Peak GPU memory of an SFT step per memory lever: fp32 / bf16 weights, gradient checkpointing, eager
   attention, and flash-attention-2 and 4-bit (QLoRA) where their packages are installed.
5. That bf16 weights and gradient checkpointing change the first step's loss by no more than their
   expected rounding (bf16: 2e-2 relative; checkpointing: 1e-3, the same kernels run again).

    python benchmarks/gpu_check.py --out gpu_check.json   # on a GPU: ~5 min on one H100-class device
    python benchmarks/gpu_check.py --tiny                 # a tiny shape on the CPU, in seconds (the test)

Each section prints as soon as it is done, and ``--out`` is rewritten after each, so a run stopped by a
time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from safeft import config as C
from safeft import devices
from safeft.data.domains import load_domain
from safeft.data.types import Example
from safeft.eval.generate import GenSettings, generate_full
from safeft.testing import build_tokenizer
from safeft.train import train

SHAPES: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.2-1B's config.json (architecture fields only)
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=4096,
    ),
    # meta-llama/Meta-Llama-3-8B's config.json (architecture fields only)
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        max_position_embeddings=4096,
    ),
    # the unit tests' shape (safeft.testing.build_model), for --tiny
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=400,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    ),
}

BOUNDS = {"bf16": 2e-2, "gradient_checkpointing": 1e-3}  # expected relative change of the first step's loss


class Check:
    """The settings of one run of this script (full size on the GPU, or --tiny on the CPU)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.tiny = args.tiny
        self.device = torch.device("cpu") if args.tiny else devices.default_device()
        self.shapes = ["tiny"] if args.tiny else ["llama-3.2-1b", "llama-3-8b"]
        self.ratio_shape = self.shapes[0]
        self.batch, self.max_length = (2, 256) if args.tiny else (args.batch_size, args.max_length)
        self.warmup, self.steps = (0, 1) if args.tiny else (args.warmup, args.steps)
        self.gen_new = 4 if args.tiny else args.max_new_tokens
        self.gen_batches = (1, 4) if args.tiny else (1, 64)
        self.tok = build_tokenizer()
        # the weights of the timed runs: bf16 on a GPU; fp32 on the CPU, where bf16 matmuls may be emulated
        self.dtype = "model.dtype=" + ("bf16" if self.device.type == "cuda" else "fp32")
        n = (self.warmup + self.steps) * self.batch * 2
        # finance rows are ~100-300 tokens of the tiny tokenizer; cut to max_length like any run
        self.examples = load_domain("finance", "train", n=n)
        self.harmful = [Example(f"h{i}", f"Explain in detail how to do harmful thing number {i}.") for i in range(64)]
        self.root = Path(tempfile.mkdtemp(prefix="safeft-gpu-check-"))

    def model(self, shape: str, dtype: torch.dtype):
        """A random-weight model of ``shape``, built on the device (seeded: every lever starts equal)."""
        from transformers import AutoModelForCausalLM, LlamaConfig

        fields = dict(SHAPES[shape])
        if shape == "tiny":
            fields["vocab_size"] = len(self.tok)
        cfg = LlamaConfig(**fields, pad_token_id=self.tok.pad_token_id)
        torch.manual_seed(0)
        with torch.device(self.device):
            return AutoModelForCausalLM.from_config(cfg, dtype=dtype)

    def cfg(self, method: str, name: str, *levers: str) -> C.RunConfig:
        over = [
            "data.task=domain:finance",
            f"data.max_length={self.max_length}",
            f"train.steps={self.warmup + self.steps}",
            f"train.batch_size={self.batch}",
            "train.lr=1e-4",
            "train.precision=" + ("fp32" if self.device.type == "cpu" else "bf16"),
            f"defense.name={method}",
            f"out_dir={self.root}",
            f"run_id={name}",
            *levers,
        ]
        if method == "saft+repanchor":
            over += ["defense.n_anchors=8", "defense.n_probe=8"] if self.tiny else []
        return C.load(overrides=over)

    def train(self, shape: str, method: str, name: str, *levers: str) -> dict[str, Any]:
        """One run of the real loop; its timed steps' means, the first loss and the peak memory."""
        cfg = self.cfg(method, name, *levers)
        dtype = devices.DTYPES[cfg.model.dtype]
        model = self.model(shape, dtype)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        res = train(
            cfg,
            examples=self.examples,
            model=model,
            tokenizer=self.tok,
            aux={"harmful_prompts": self.harmful},
            progress=False,
        )
        peak = devices.peak_memory(self.device)
        timed = res.metrics[self.warmup :]
        s = statistics.mean(r["time/step_s"] for r in timed)
        out = {
            "s_per_step": s,
            "tokens_per_s": statistics.mean(r["tokens"] for r in timed) / s,
            "positions_per_s": statistics.mean(r["positions"] for r in timed) / s,
            "first_loss": res.metrics[0]["loss"],
            "peak_gib": None if peak is None else peak / 2**30,
        }
        del model, res
        _free()
        return out

    def generate(self, shape: str) -> dict[str, Any]:
        model = self.model(shape, torch.bfloat16 if self.device.type == "cuda" else torch.float32).eval()
        prompts = [e.prompt for e in self.examples]
        out = {}
        for b in self.gen_batches:
            settings = GenSettings(
                self.gen_new, batch_size=b, precision="fp32" if self.device.type == "cpu" else "bf16"
            )
            n = max(b, 4) if b == 1 else b  # a few single prompts; one full batch
            generate_full(model, self.tok, prompts[:b], settings, progress=False)  # warm-up (kernels, cache)
            _sync(self.device)
            t = time.perf_counter()
            gens = generate_full(model, self.tok, (prompts * 64)[:n], settings, progress=False)
            _sync(self.device)
            dt = time.perf_counter() - t
            out[f"batch_{b}"] = {"prompts": n, "new_tokens": sum(g.n_tokens for g in gens), "tokens_per_s": 0.0}
            out[f"batch_{b}"]["tokens_per_s"] = out[f"batch_{b}"]["new_tokens"] / dt
        del model
        _free()
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def levers_available(device: torch.device) -> dict[str, str]:
    """Lever -> its config overrides, for the levers this machine can run."""
    out = {
        "fp32 weights": "model.dtype=fp32",
        "bf16 weights": "model.dtype=bf16",
        "bf16 + gradient checkpointing": "model.dtype=bf16 model.gradient_checkpointing=true",
        "bf16 + eager attention": "model.dtype=bf16 model.attn_implementation=eager",
    }
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        out["bf16 + flash-attention-2"] = "model.dtype=bf16 model.attn_implementation=flash_attention_2"
    return out


def qlora_peak(check: Check, shape: str) -> dict[str, Any] | str:
    """An SFT run with the base in 4-bit (QLoRA); it must be loaded from disk, so the model is saved first."""
    if check.device.type != "cuda":
        return "skipped: 4-bit needs a CUDA GPU"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "skipped: bitsandbytes is not installed (pip install 'safeft[qlora]')"
    spec = check.root / f"{shape}-bf16"
    model = check.model(shape, torch.bfloat16)
    model.save_pretrained(spec)
    check.tok.save_pretrained(spec)
    del model
    _free()
    from safeft import models

    cfg = check.cfg("sft", f"{shape}-qlora", f"model.spec={spec}", "model.load_in_4bit=true")
    torch.cuda.reset_peak_memory_stats(check.device)
    model, tok = models.load(str(spec), **devices.load_args(cfg.model))
    res = train(cfg, examples=check.examples, model=model, tokenizer=tok, progress=False)
    timed = res.metrics[check.warmup :]
    peak = devices.peak_memory(check.device)
    del model, res
    _free()
    return {"s_per_step": statistics.mean(r["time/step_s"] for r in timed), "peak_gib": peak / 2**30}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny shape on the CPU (seconds): checks the script")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, help="write the results here as JSON (after every section)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    check = Check(args)
    if check.device.type != "cuda" and not args.tiny:
        p.error(f"no CUDA device here (the placement rule says {check.device}); use --tiny for the CPU check")
    res: dict[str, Any] = {
        "device": _describe(check.device),
        "shapes": check.shapes,
        "batch": check.batch,
        "max_length": check.max_length,
    }

    def section(name: str, value: Any) -> None:
        res[name] = value
        print(f"\n== {name}\n{json.dumps(value, indent=1)}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(res, indent=1))

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the loop's own prints do not mix into the report
        section("sft", {s: check.train(s, "sft", f"sft-{s}", check.dtype) for s in check.shapes})
        shape = check.ratio_shape
        runs = {"sft_before": check.train(shape, "sft", "r-sft-0", check.dtype)}
        for m in ("sbr", "saft+repanchor"):
            runs[m] = check.train(shape, m, f"r-{m}", check.dtype)
        runs["sft_after"] = check.train(shape, "sft", "r-sft-1", check.dtype)
        sft = (runs["sft_before"]["s_per_step"] + runs["sft_after"]["s_per_step"]) / 2
        ratios = {m: runs[m]["s_per_step"] / sft for m in ("sbr", "saft+repanchor")}
        sft_runs = [runs["sft_before"]["s_per_step"], runs["sft_after"]["s_per_step"]]
        section("ratios_to_sft", {"shape": shape, **ratios, "sft_s_per_step": sft_runs})
        section("generate", {s: check.generate(s) for s in check.shapes})
        levers: dict[str, Any] = {}
        for s in check.shapes:
            for label, over in levers_available(check.device).items():
                if s != check.shapes[0] and label.startswith("fp32"):
                    continue  # an 8B model in fp32 measures nothing the 1B run does not
                levers[f"{s}: {label}"] = check.train(s, "sft", f"lever-{s}-{len(levers)}", *over.split())
            levers[f"{s}: 4-bit QLoRA"] = qlora_peak(check, s)
        section(
            "levers",
            {
                k: v if isinstance(v, str) else {"peak_gib": v["peak_gib"], "s_per_step": v["s_per_step"]}
                for k, v in levers.items()
            },
        )
        s = check.shapes[0]
        fp32 = levers[f"{s}: fp32 weights"]["first_loss"]
        bf16 = levers[f"{s}: bf16 weights"]["first_loss"]
        gc_ = levers[f"{s}: bf16 + gradient checkpointing"]["first_loss"]
        rounding = {
            "bf16_vs_fp32": {"rel_change": abs(bf16 - fp32) / abs(fp32), "bound": BOUNDS["bf16"]},
            "checkpointing_vs_none": {
                "rel_change": abs(gc_ - bf16) / abs(bf16),
                "bound": BOUNDS["gradient_checkpointing"],
            },
        }
        for r in rounding.values():
            r["ok"] = r["rel_change"] <= r["bound"]
        section("rounding", rounding)
    res["total_s"] = time.perf_counter() - t0
    print(_table(res), flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return res


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"
    return f"cpu, torch {torch.__version__}"


def _table(res: dict[str, Any]) -> str:
    lines = [f"\nsafeft GPU check on {res['device']} (batch {res['batch']} x max {res['max_length']} tokens)", ""]
    for s, r in res["sft"].items():
        lines.append(
            f"SFT {s}: {r['s_per_step']:.3f} s/step, {r['tokens_per_s']:.0f} task tokens/s, "
            f"{r['positions_per_s']:.0f} positions/s"
        )
    rt = res["ratios_to_sft"]
    lines.append(f"step ratio to SFT ({rt['shape']}): SBR {rt['sbr']:.2f}x, SAFT+RepAnchor {rt['saft+repanchor']:.2f}x")
    for s, g in res["generate"].items():
        lines.append(
            f"generate {s}: " + ", ".join(f"{k.replace('_', ' ')} {v['tokens_per_s']:.0f} tok/s" for k, v in g.items())
        )
    for k, v in res["levers"].items():
        peak = v if isinstance(v, str) else ("n/a (CPU)" if v["peak_gib"] is None else f"{v['peak_gib']:.2f} GiB")
        lines.append(f"peak memory, {k}: {peak}")
    for k, r in res["rounding"].items():
        lines.append(
            f"loss change {k}: {r['rel_change']:.2e} (bound {r['bound']:.0e}) {'ok' if r['ok'] else 'TOO LARGE'}"
        )
    lines.append(f"total {res['total_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
