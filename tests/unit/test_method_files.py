"""Method files are uniform: one name declaration checked by ``register``, values checked when the config is
built (naming ``defense.<key>``, what is allowed and the value), ``ctx`` typed, no method file importing another.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from safeft import config as C
from safeft.config import DefenseConfig
from safeft.methods import METHODS
from safeft.methods.base import Defense
from safeft.methods.registry import DefenseRegistry

METHODS_DIR = Path(__file__).resolve().parents[2] / "src" / "safeft" / "methods"
HELPERS = {"__init__", "base", "registry", "weights", "anchors"}  # shared modules, not defenses
# A composed defense imports the defenses it composes (its config is the union of theirs); nothing else may.
COMPOSITIONS = {"saft_repanchor": {"saft", "repanchor"}}


def _method_files() -> list[Path]:
    return sorted(p for p in METHODS_DIR.glob("*.py") if p.stem not in HELPERS)


# ----------------------------------------------------------------------------- registration


def test_every_registered_name_is_the_class_name_and_the_config_default():
    for name in METHODS:
        cls = METHODS.get(name)
        default = {f.name: f.default for f in dataclasses.fields(cls.Config)}["name"]
        assert cls.name == name == default


def _toy(config_name: str | None, stage: str = "finetune", base: type = DefenseConfig):
    """A toy defense class whose Config declares ``config_name`` (or no name of its own when None)."""
    ns: dict = {"__annotations__": {"lam": "float"}, "lam": 1.0}
    if config_name is not None:
        ns["__annotations__"]["name"] = "str"
        ns["name"] = config_name
    config = dataclasses.dataclass(type("ToyConfig", (base,), ns))
    return type("Toy", (Defense,), {"stage": stage, "Config": config})


def test_register_reads_the_name_from_the_config():
    reg = DefenseRegistry("defense")
    cls = reg.add(_toy("toy"))
    assert cls.name == "toy" and reg.get("toy") is cls and cls.Config().name == "toy"


def test_the_older_three_declaration_form_still_registers():
    reg = DefenseRegistry("defense")
    old = _toy("toy")
    old.name = "toy"
    assert reg.register("toy")(old) is old and reg.get("toy") is old


@pytest.mark.parametrize(
    "make, register_as, match",
    [
        (lambda: _toy(None), None, "must declare the method's name itself"),  # inherits "sft"
        (lambda: _toy(None, base=_toy("parent").Config), None, "inherits 'parent'"),
        (lambda: _toy("Toy"), None, "lower-case"),
        (lambda: _toy("toy"), "other", "registered as 'other' but its Config declares 'toy'"),
        (lambda: _toy("toy", stage="train"), None, "stage must be one of"),
    ],
)
def test_register_refuses_declarations_that_disagree(make, register_as, match):
    reg = DefenseRegistry("defense")
    cls = make()
    with pytest.raises(TypeError, match=match):
        reg.register(register_as)(cls) if register_as else reg.add(cls)
    assert list(reg) == []


def test_a_class_name_that_disagrees_with_its_config_is_refused():
    cls = _toy("toy")
    cls.name = "other"
    with pytest.raises(TypeError, match="says name = 'other'"):
        DefenseRegistry("defense").add(cls)


# ----------------------------------------------------------------------------- validation


BAD = [  # (method, key, a value outside its range, typed as the config holds it)
    ("vaccine", "rho", -1.0),
    ("vaccine", "perturb_site", "mlp"),
    ("booster", "lam", -1.0),
    ("booster", "alpha", -0.1),
    ("booster", "harmful_batch", 0),
    ("repnoise", "beta", -1.0),
    ("repnoise", "kernel_num", 0),
    ("repnoise", "kernel_mul", 0.0),
    ("repnoise", "noise_site", "attn"),
    ("ewc", "lam", -1.0),
    ("ewc", "fisher_samples", 0),
    ("ewc", "fisher_reduction", "max"),
    ("lisa", "align_steps", 0),
    ("lisa", "prox_warmup", 2.0),
    ("mixing", "variant", "both"),
    ("mixing", "fraction", 1.0),
    ("mixing", "safety_batch", 0),
    ("sap", "probe_lr", 0.0),
    ("sap", "layers", []),
    ("sap", "contrastive_batch", 0),
    ("safelora", "select", "all"),
    ("safelora", "threshold", 2.0),
    ("safelora", "num_proj_layers", -1),
]


@pytest.mark.parametrize("name, key, value", BAD, ids=[f"{n}.{k}" for n, k, _ in BAD])
def test_a_bad_value_fails_when_the_config_is_loaded(name, key, value):
    extra = ["defense.base_model=x"] if name == "safelora" else []
    with pytest.raises(C.ConfigError, match=rf"defense\.{key} must be .+, not {re.escape(repr(value))}$"):
        C.load(overrides=[f"defense.name={name}", *extra, f"defense.{key}={value}"])


def test_safelora_without_a_base_model_fails_when_the_config_is_loaded():
    with pytest.raises(C.ConfigError, match=r"defense\.base_model must be set .*, not None"):
        C.load(overrides=["defense.name=safelora"])


# ----------------------------------------------------------------------------- the source


def _imported_modules(source: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def sibling_imports(source: str, stem: str, methods: set[str]) -> list[str]:
    """The other method modules that ``source`` (the file ``methods/<stem>.py``) imports."""
    mods = {m.split(".")[2] for m in _imported_modules(source) if m.startswith("safeft.methods.")}
    return sorted(mods & methods - {stem})


def untyped_ctx(source: str) -> list[str]:
    """Functions in ``source`` with a ``ctx`` parameter not annotated ``RunContext``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
                if arg.arg == "ctx" and (arg.annotation is None or ast.unparse(arg.annotation) != "RunContext"):
                    out.append(f"{node.lineno} {node.name}")
    return out


def test_the_source_checks_see_what_they_look_for():
    methods = {"booster", "sap"}
    assert sibling_imports("from safeft.methods.sap import shifted", "booster", methods) == ["sap"]
    assert sibling_imports("from safeft.methods import sap", "booster", methods) == ["sap"]
    assert sibling_imports("from safeft.methods.weights import shifted", "booster", methods) == []
    assert untyped_ctx("def f(ctx, x): ...\ndef g(ctx: RunContext): ...") == ["1 f"]


def test_no_method_file_imports_another_method_file():
    methods = {p.stem for p in METHODS_DIR.glob("*.py")} - HELPERS
    bad = {
        p.stem: [m for m in sibling_imports(p.read_text(), p.stem, methods) if m not in COMPOSITIONS.get(p.stem, ())]
        for p in _method_files()
    }
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"method files import other method files (move the shared part to a helper module): {bad}"


def test_ctx_is_typed_as_the_run_context_everywhere():
    bad = {p.name: untyped_ctx(p.read_text()) for p in _method_files()}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"ctx without the RunContext annotation: {bad}"
