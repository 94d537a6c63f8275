"""The benchmark and workflow scripts call dsf as it is now.

They run outside the test suite (benchmarks on demand, on a GPU machine; workflow scripts inside
Snakemake jobs), so a renamed function or a new required argument would only show when someone
reruns them: `bench/labels.py` imported a colour table and called the tracer without its
tolerance for several sessions. Every name they take from dsf must exist, every call of a dsf
function or class must bind to its signature, and every `dsf <stage>` command they run must
name options the stage has.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(ROOT.glob("bench/*.py"))


def _resolve(module: str, name: str) -> Any:
    """`module.name`: an attribute, or a submodule of that name."""
    mod = importlib.import_module(module)
    if hasattr(mod, name):
        return getattr(mod, name)
    return importlib.import_module(f"{module}.{name}")


def _dsf_names(tree: ast.Module) -> tuple[dict[str, Any], list[str]]:
    """(local name -> dsf object, problems) for every import from dsf anywhere in the file
    (imports inside functions included)."""
    names: dict[str, Any] = {}
    problems: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "dsf":
            for alias in node.names:
                try:
                    names[alias.asname or alias.name] = _resolve(node.module, alias.name)
                except (ImportError, AttributeError):
                    problems.append(f"line {node.lineno}: {node.module} has no {alias.name!r}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "dsf":
                    names[alias.asname or alias.name] = importlib.import_module(alias.name)
    return names, problems


def _target(func: ast.expr, names: dict[str, Any]) -> tuple[str, Any] | None:
    """(dotted name, dsf object) a call's function expression names (`f`, `mod.f`,
    `dsf.mod.f`), an AttributeError as the object where the attribute is gone, or None when
    it is not dsf's."""
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.insert(0, func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    parts.insert(0, func.id)
    dotted = ".".join(parts)
    for i in range(len(parts), 0, -1):  # the longest imported prefix: `dsf.slide` of dsf.slide.f
        prefix = ".".join(parts[:i])
        if prefix not in names:
            continue
        obj = names[prefix]
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return dotted, AttributeError(f"{dotted}: no attribute {attr!r}")
            obj = getattr(obj, attr)
        return dotted, obj
    return None


def _problems(source: str) -> list[str]:
    """Names taken from dsf that are gone and calls of dsf that do not bind, in a script."""
    tree = ast.parse(source)
    names, problems = _dsf_names(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        found = _target(node.func, names)
        if found is None:
            continue
        dotted, obj = found
        if isinstance(obj, AttributeError):
            problems.append(f"line {node.lineno}: {obj}")
            continue
        if not callable(obj):
            continue
        if any(isinstance(a, ast.Starred) for a in node.args) or any(
            k.arg is None for k in node.keywords
        ):
            continue  # *args / **kwargs: not checkable statically
        try:
            signature = inspect.signature(obj)
        except (TypeError, ValueError):
            continue  # a builtin without a signature
        try:
            signature.bind(*node.args, **{k.arg: k.value for k in node.keywords if k.arg})
        except TypeError as exc:
            problems.append(f"line {node.lineno}: {dotted}{signature}: {exc}")
    return problems


def _cli_problems(source: str) -> list[str]:
    """Options a command list (`["dsf", "<stage>", "--opt", ...]`) gives that the stage's parser
    does not have: every string literal starting with `--` after `dsf <stage>` in the list."""
    from dsf.cli import STAGES

    problems: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.List):
            continue
        words = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
        for i, word in enumerate(words[:-1]):
            stage = words[i + 1]
            if word != "dsf" or not isinstance(stage, str):
                continue
            if stage not in STAGES:
                problems.append(f"line {node.lineno}: dsf has no stage {stage!r}")
                continue
            known = importlib.import_module(STAGES[stage][0])._parser()._option_string_actions
            for opt in words[i + 2 :]:
                if isinstance(opt, str) and opt.startswith("--") and opt not in known:
                    problems.append(f"line {node.lineno}: dsf {stage} has no option {opt}")
    return problems


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_script_calls_dsf_as_it_is(script: Path) -> None:
    problems = _problems(script.read_text()) + _cli_problems(script.read_text())
    assert not problems, f"{script.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_the_check_sees_stale_names_and_calls() -> None:
    """The check itself: a name gone, an attribute gone, a call without a required keyword
    and one with an argument too many are reported; calls that bind are not."""
    stale = (
        "import dsf.colours\n"
        "from dsf import synth\n"
        "def f(labels):\n"
        "    from dsf.synth_tissue import CLASS_COLORS\n"
        "    from dsf.trace import class_features\n"
        "    dsf.colours.class_colours(4, 5)\n"
        "    dsf.colours.class_colours(4)\n"
        "    synth.no_such_function()\n"
        "    return list(class_features(labels, 1.0, {}))\n"
    )
    problems = _problems(stale)
    assert len(problems) == 4, problems
    assert "CLASS_COLORS" in problems[0]
    joined = "\n".join(problems)
    assert "line 6: dsf.colours.class_colours" in joined
    assert "line 8: synth.no_such_function: no attribute" in joined
    assert "line 9: class_features" in joined and "tolerance" in joined
    commands = (
        'a = ["dsf", "labels", "--slide", x, "--no-such", "--threads", "2"]\n'
        'b = ["dsf", "no-stage", "--out", x]\n'
        'c = ["dsf", "tissue", "--slide", x, "--mask", y]\n'
    )
    assert _cli_problems(commands) == [
        "line 1: dsf labels has no option --no-such",
        "line 2: dsf has no stage 'no-stage'",
    ]
