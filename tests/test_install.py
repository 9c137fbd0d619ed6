"""`pip install vit-pretrain` alone (no extra) into a fresh venv: it exports a real ZeRO-3 checkpoint, loads the
export, runs `predict`, imports nothing of DeepSpeed, boto3, tensorboard or matplotlib, and the commands of the
extras say which extra to install.

The package is installed with `pip install --no-deps`, then the core's declared dependencies from constraints.txt,
except torch and torchvision: those two, with their own dependencies (the CUDA wheels, ~3 GB), are linked from this
venv through a `.pth` file instead of being copied again. Nothing else of this venv is visible in the fresh one.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.ports import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
LINKED = {"torch", "torchvision"}
OPTIONAL = ["deepspeed", "boto3", "botocore", "urllib3", "tensorboard", "matplotlib", "accelerate", "sklearn", "wandb"]

CORE_SCRIPT = """
import json, sys
from pathlib import Path
from pretrain.downstream.backbone import load_backbone
from pretrain.downstream.predict import main as predict
from pretrain.export import export_checkpoint

run, out, image = map(Path, sys.argv[1:])
export_checkpoint(run, out, "timm")
backbone = load_backbone(out)
rc = predict([str(out), str(image), "--top-k", "3"])
loaded = sorted({m.split(".")[0] for m in sys.modules})
import pretrain
print(json.dumps({"rc": rc, "classes": len(backbone.class_names), "loaded": loaded, "from": pretrain.__file__}))
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def core_requirements() -> list[str]:
    """The core's declared dependencies (pyproject.toml's `dependencies`, as installed: no `extra` marker), pinned to
    constraints.txt."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonical(name)] = version.strip()
    declared = [r for r in importlib.metadata.requires("vit-pretrain") or [] if "extra ==" not in r]
    names = [re.match(r"[A-Za-z0-9_.-]+", d)[0] for d in declared]
    return [f"{n}=={pins[canonical(n)]}" for n in names]


def torch_stack() -> set[str]:
    """torch, torchvision and everything they require (markers of this machine), closed; the core's other declared
    dependencies (numpy, pillow) are left to pip."""
    from packaging.requirements import Requirement

    core = {canonical(r.split("==")[0]) for r in core_requirements()} - LINKED
    todo, seen = sorted(LINKED), set()
    while todo:
        name = canonical(todo.pop())
        if name in seen or name in core:
            continue
        seen.add(name)
        for line in importlib.metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def link_torch(site: Path, links: Path) -> None:
    """Symlink the top-level files of the torch stack into `links`, and put `links` on the fresh venv's path."""
    links.mkdir()
    for name in torch_stack():
        dist = importlib.metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if not (links / top).exists():
                (links / top).symlink_to(Path(dist.locate_file(top)).resolve())
    (site / "torch_stack.pth").write_text(f"{links}\n")


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory) -> Path:
    """A fresh venv holding the core: the package without deps, then its declared dependencies."""
    tmp = tmp_path_factory.mktemp("core")
    src = tmp / "src"  # a copy: pip builds in the source folder, which must not be this checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in ("pretrain", "data_tools"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--no-deps", str(src)], check=True, capture_output=True)
    others = [r for r in core_requirements() if canonical(r.split("==")[0]) not in LINKED]
    subprocess.run([*pip, "-c", str(ROOT / "constraints.txt"), *others], check=True, capture_output=True)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([str(py), "-c", where], text=True).strip())
    link_torch(site, tmp / "torch_stack")
    return venv


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> Path:
    """A real bf16 ZeRO-3 checkpoint of 2 CPU ranks (tests/helpers/make_ds_checkpoint.py, this venv)."""
    run = tmp_path_factory.mktemp("zero3") / "run"
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += [str(ROOT / "tests" / "helpers" / "make_ds_checkpoint.py"), str(run), "--stage", "3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{launcher.parent}{os.pathsep}{os.environ['PATH']}"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return run


def clean_env(venv: Path) -> dict[str, str]:
    """This process's environment without anything that points at this checkout or venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}"}


def test_core_exports_loads_and_predicts_without_any_extra(core_venv, zero3_run, tmp_path):
    from PIL import Image

    py, env = core_venv / "bin" / "python", clean_env(core_venv)
    missing = subprocess.run([str(py), "-c", "import deepspeed"], capture_output=True, env=env, cwd=tmp_path)
    assert missing.returncode != 0  # the fresh venv really lacks the extras
    image = tmp_path / "digit.png"
    Image.new("RGB", (40, 36), (120, 30, 200)).save(image)
    out = tmp_path / "export"
    p = subprocess.run(
        [str(py), "-c", CORE_SCRIPT, str(zero3_run), str(out), str(image)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["rc"] == 0 and result["classes"] == 10
    assert lines[0] == str(image) and len(lines) == 1 + 3 + 1  # the image, its top 3, the JSON line
    assert sorted(set(result["loaded"]) & set(OPTIONAL)) == []
    assert Path(result["from"]).is_relative_to(core_venv)  # the installed package, not this checkout
    # the console scripts of the core are installed and work
    again = subprocess.run(["vit-predict", str(out), str(image)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.splitlines()[0] == str(image), again.stderr


@pytest.mark.parametrize(
    "command,line",
    [
        (["vit-train", "--config", "any.yaml"], "deepspeed is not installed: pip install 'vit-pretrain[train]'"),
        (["vit-finetune", "--data", "nowhere"], "accelerate is not installed: pip install 'vit-pretrain[finetune]'"),
        (["data-tools", "info", "s3://bucket/shards"], "urllib3 is not installed: pip install 'vit-pretrain[remote]'"),
        (["vit-plot", "runs/none"], "matplotlib is not installed: pip install 'vit-pretrain[train]'"),
    ],
)
def test_commands_of_the_extras_name_the_extra(core_venv, tmp_path, command, line):
    p = subprocess.run(command, capture_output=True, text=True, env=clean_env(core_venv), cwd=tmp_path)
    assert (p.returncode, p.stderr) == (2, f"error: {line}\n")
