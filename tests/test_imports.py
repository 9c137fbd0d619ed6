"""Import hygiene: no import circle in `pretrain/` or `data_tools/`, the core imports no optional package, and a
command that needs a missing extra says which one in one line (exit 2). The fresh-venv install of the core alone is
tests/test_install.py."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.extras import MissingExtra, extra_for, require

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("deepspeed", "boto3", "botocore", "urllib3", "tensorboard", "matplotlib", "accelerate", "sklearn", "wandb")


def module_graph() -> dict[str, set[str]]:
    """Every module of pretrain/ and data_tools/ -> the modules of both it imports (at any depth of the file, lazy
    imports included; `if TYPE_CHECKING:` blocks left out, as they never run)."""
    files = {}
    for pkg in ("pretrain", "data_tools"):
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in files.items():
        tree = ast.parse(f.read_text())
        typing_only = {
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for n in ast.walk(block)
        }
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, `level - 1` folders up
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds an import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or w != v:
                w = stack.pop()
                component.add(w)
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_in_pretrain_or_data_tools():
    graph = module_graph()
    assert len(graph) > 50 and "pretrain.train.trainer" in graph["pretrain.train.__main__"]  # the graph is real
    assert circles(graph) == []
    from_data_tools = set().union(*(graph[m] for m in graph if m.startswith("data_tools")))
    assert not any(m.startswith("pretrain") for m in from_data_tools)  # data_tools never imports pretrain


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_the_core_imports_no_optional_package():
    """What `pip install vit-pretrain` serves (export, backbone, predict, plan, config, data-tools) and the entry points
    of the extras (imported, not run) reach no optional package at import time."""
    modules = [
        "pretrain.export.__main__",
        "pretrain.downstream.predict",
        "pretrain.downstream.backbone",
        "pretrain.plan",
        "pretrain.config",
        "data_tools.__main__",
        "pretrain.train.__main__",
        "pretrain.train.plot",
        "pretrain.train.universal",
        "pretrain.downstream.finetune",
        "pretrain.demo.__main__",
    ]
    code = f"import sys, json\nfor m in {modules!r}: __import__(m)\nprint(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True).stdout)
    assert sorted({m.split(".")[0] for m in loaded} & set(OPTIONAL)) == []


def test_each_optional_package_is_named_by_its_extra():
    """Read from the installed metadata, i.e. pyproject.toml: no second list."""
    extras = {p: extra_for(p) for p in ("deepspeed", "tensorboard", "matplotlib", "boto3", "urllib3", "accelerate")}
    assert extras == {
        "deepspeed": "train",
        "tensorboard": "train",
        "matplotlib": "train",
        "boto3": "remote",
        "urllib3": "remote",
        "accelerate": "finetune",
    }
    assert (extra_for("scikit-learn"), extra_for("wandb"), extra_for("torch")) == ("demo", "wandb", None)


@pytest.fixture
def without(monkeypatch):
    """Make the given top-level modules look uninstalled (`require` asks importlib.util.find_spec)."""
    real = importlib.util.find_spec

    def hide(*modules: str) -> None:
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))

    return hide


def _entry(name: str):
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize(
    "entry,argv,missing,line",
    [
        ("pretrain.train.__main__:main", ["--config", "configs/tiny_digits.yaml"], "deepspeed", "deepspeed[train]"),
        ("pretrain.train.universal:main", ["runs/none"], "deepspeed", "deepspeed[train]"),
        ("pretrain.train.plot:main", ["runs/none"], "matplotlib", "matplotlib[train]"),
        ("pretrain.downstream.finetune:main", ["--data", "nowhere"], "accelerate", "accelerate[finetune]"),
        ("data_tools.__main__:main", ["info", "s3://bucket/shards"], "boto3", "boto3[remote]"),
        ("data_tools.__main__:main", ["digits", "unused"], "sklearn", "scikit-learn[demo]"),
        ("pretrain.demo.__main__:main", [], "timm", "timm[demo]"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(entry, argv, missing, line, without, capsys):
    without(missing)
    package, _, extra = line.partition("[")
    assert _entry(entry)(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: {package} is not installed: pip install 'vit-pretrain[{extra}'\n", err


def test_require_passes_an_installed_package_and_names_the_fix_otherwise(without):
    require("torch")
    without("deepspeed")
    with pytest.raises(MissingExtra, match=r"^deepspeed is not installed: pip install 'vit-pretrain\[train\]'$"):
        require("deepspeed")
    without("not_a_package_of_ours")
    with pytest.raises(MissingExtra, match="^not-ours is not installed: pip install not-ours$"):
        require("not_a_package_of_ours", "not-ours")
