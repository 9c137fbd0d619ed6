"""The lent-GPU kit (`benchmarks.device_kit`) and session script (`benchmarks/gpu_session.sh`), checked on the CPU:
constraints lookup, pip arguments, what DEST keeps, the size check; that every package the GPU entry points import
is carried or already on the device; that the script parses and its training overrides are valid config keys.
No network: nothing here downloads."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from benchmarks import device_kit as kit
from pretrain.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
OURS = {"benchmarks", "pretrain", "data_tools", "tests"}  # travel with the working tree
ENTRY_POINTS = ("benchmarks.bench_gpu", "pretrain.data", "data_tools.shard", "pretrain.train.__main__")
# Imported on the device by DeepSpeed's launcher and engine, beyond `import deepspeed`.
DEEPSPEED_RUNTIME = ("deepspeed.launcher.runner", "deepspeed.launcher.launch", "deepspeed.ops.adam")
DEVICE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}


# ------------------------------------------------------------------------------------------------ pure parts


def test_parse_constraints_pins_comments_markers_and_extras():
    text = "# header\n\nPyYAML==6.0.3\npydantic_core==2.50.4  # why\nfoo[bar]==1.0 ; python_version < '3.13'\n"
    assert kit.parse_constraints(text) == {"pyyaml": "6.0.3", "pydantic-core": "2.50.4", "foo": "1.0"}
    with pytest.raises(kit.KitError, match="line 2 is not name==version"):
        kit.parse_constraints("a==1\nb>=2\n")


def test_every_kit_package_is_pinned_in_constraints_txt():
    pins = kit.kit_pins(kit.parse_constraints(kit.CONSTRAINTS.read_text()))
    assert set(pins) == set(kit.KIT)
    assert pins["deepspeed"] == "0.19.8" and pins["webdataset"] == "1.0.2"  # the README's versions
    with pytest.raises(kit.KitError, match="hjson not pinned"):
        kit.kit_pins({"deepspeed": "0.19.8"}, {"deepspeed": "", "hjson": ""})


def test_download_args_ask_for_one_binary_wheel_for_the_devices_python():
    args = kit.download_args("py", "pydantic-core", "2.50.4", Path("d"))
    assert args[:4] == ["py", "-m", "pip", "download"] and args[-1] == "pydantic-core==2.50.4"
    assert {"--no-deps", "--only-binary=:all:"} <= set(args)
    assert args[args.index("--python-version") + 1] == "3.12" and args[args.index("--implementation") + 1] == "cp"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--platform"] == list(kit.PLATFORMS)
    assert args[args.index("-d") + 1] == "d"


def test_deepspeed_is_built_from_its_sdist_without_ops():
    dl = kit.sdist_args("py", "deepspeed", "0.19.8", Path("w"))
    assert dl[3] == "download" and {"--no-binary", "--no-build-isolation", "--no-deps"} <= set(dl)
    assert dl[-1] == "deepspeed==0.19.8" and dl[dl.index("-d") + 1] == "w"
    build = kit.wheel_build_args("py", Path("w/deepspeed-0.19.8.tar.gz"), Path("d"))
    assert build[3] == "wheel" and {"--no-deps", "--no-build-isolation"} <= set(build)
    assert build[build.index("-w") + 1] == "d" and build[-1] == str(Path("w/deepspeed-0.19.8.tar.gz"))
    env = kit.build_env({"PATH": "/bin", "DS_BUILD_OPS": "1"})
    assert env == {"PATH": "/bin", "DS_BUILD_OPS": "0", "DS_ACCELERATOR": "cuda"}
    assert kit.SDIST_ONLY <= set(kit.KIT)


def test_wheel_names_and_what_dest_keeps():
    assert kit.wheel_name_version("pydantic_core-2.50.4-cp312-cp312-manylinux_2_17_x86_64.whl") == (
        "pydantic-core",
        "2.50.4",
    )
    assert kit.wheel_name_version("deepspeed-0.19.8-1-py3-none-any.whl") == ("deepspeed", "0.19.8")  # build tag
    assert kit.wheel_name_version("deepspeed-0.19.8.tar.gz") is None
    present = ["webdataset-1.0.2-py3-none-any.whl", "hjson-3.0.0-py3-none-any.whl", "boto3-1.0-py3-none-any.whl"]
    fetch, keep, remove = kit.plan(present, {"webdataset": "1.0.2", "hjson": "3.1.0", "braceexpand": "0.1.7"})
    assert fetch == {"hjson": "3.1.0", "braceexpand": "0.1.7"}
    assert keep == ["webdataset-1.0.2-py3-none-any.whl"]
    assert remove == ["boto3-1.0-py3-none-any.whl", "hjson-3.0.0-py3-none-any.whl"]
    assert kit.plan(keep, {"webdataset": "1.0.2"}) == ({}, keep, [])  # idempotent


def test_size_check():
    assert kit.size_problem(5 * 2**20, 1 * 2**20) is None
    line = kit.size_problem(58 * 2**20, 3 * 2**20)
    assert line is not None and "61.00 MiB exceeds 60.00 MiB" in line and "\n" not in line
    assert kit.size_problem(10, 0, limit=10) is None and kit.size_problem(11, 0, limit=10) is not None


# ------------------------------------------------------------------------------ the kit covers what we import


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def _imports_of(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (lazy imports inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def _third_party_imports(entry_points: tuple[str, ...]) -> set[str]:
    """Top-level names of the non-stdlib packages that our modules reachable from `entry_points` import."""
    todo, seen, third = list(entry_points), set(), set()
    while todo:
        name = todo.pop()
        top = name.split(".")[0]
        if name in seen or top in sys.stdlib_module_names:
            continue
        seen.add(name)
        if top not in OURS:
            third.add(top)
            continue
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # a package's __init__ runs first
        f = _module_file(name)
        if f is not None:  # else `from package import name` named no module
            todo += _imports_of(f)
    return third


def _distributions(tops: set[str]) -> set[str]:
    owners = metadata.packages_distributions()
    unknown = sorted(t for t in tops if t not in owners)
    assert not unknown, f"no installed distribution provides {unknown}"
    return {kit.canonical(d) for t in tops for d in owners[t]}


def _kit_requirements() -> dict[str, set[str]]:
    """kit package -> the packages its installed metadata requires on the device (extras and markers resolved)."""
    out = {}
    for name in kit.KIT:
        reqs = [Requirement(r) for r in metadata.requires(name) or []]
        out[name] = {kit.canonical(r.name) for r in reqs if r.marker is None or r.marker.evaluate(DEVICE_MARKERS)}
    return out


def test_every_package_our_gpu_entry_points_import_is_carried_or_on_the_device():
    dists = _distributions(_third_party_imports(ENTRY_POINTS))
    known = set(kit.KIT) | kit.DEVICE_PACKAGES | set(kit.NOT_NEEDED)
    assert dists - known == set(), "add them to KIT (and constraints.txt) or, if the image has them, DEVICE_PACKAGES"
    assert {"torch", "torchvision", "timm", "deepspeed", "webdataset"} <= dists  # the walk does reach them


def test_kit_packages_requirements_are_carried_or_on_the_device_and_every_kit_package_is_needed():
    pins = kit.kit_pins(kit.parse_constraints(kit.CONSTRAINTS.read_text()))
    assert {n: metadata.version(n) for n in kit.KIT} == pins, "the venv's versions are not the carried ones"
    requires = _kit_requirements()
    missing = {n: sorted(r - set(kit.KIT) - kit.DEVICE_PACKAGES) for n, r in requires.items()}
    assert {n: r for n, r in missing.items() if r} == {}
    needed = _distributions(_third_party_imports(ENTRY_POINTS)) & set(kit.KIT)
    while True:  # what the imported kit packages require, transitively
        more = set().union(*(requires[n] for n in needed)) & set(kit.KIT)
        if more <= needed:
            break
        needed |= more
    assert needed == set(kit.KIT), f"carried but needed by nothing: {sorted(set(kit.KIT) - needed)}"
    assert not set(kit.KIT) & kit.DEVICE_PACKAGES - {"typing-extensions"}  # carried only for a newer version


_IMPORT_AFTER_BASELINE = """
import importlib, json, sys
baseline, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for m in baseline:
    importlib.import_module(m)
before = set(sys.modules)
for m in modules:
    importlib.import_module(m)
print(json.dumps(sorted({m.split(".")[0] for m in set(sys.modules) - before})))
"""


def test_importing_our_entry_points_and_the_kit_pulls_in_nothing_the_device_lacks():
    """Run-time imports (what the kit packages import themselves), after the device's own packages are imported
    (so that their dependencies, the device's business, are not counted)."""
    owners = metadata.packages_distributions()
    third = _third_party_imports(ENTRY_POINTS) - {"boto3", "botocore", "wandb"}
    baseline = sorted(t for t in third if {kit.canonical(d) for d in owners[t]} <= kit.DEVICE_PACKAGES)
    modules = [*ENTRY_POINTS, *sorted(third - set(baseline)), *DEEPSPEED_RUNTIME]
    p = subprocess.run(
        [sys.executable, "-c", _IMPORT_AFTER_BASELINE, json.dumps(baseline), json.dumps(modules)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    tops = {t for t in json.loads(p.stdout.splitlines()[-1]) if t not in OURS and t not in sys.stdlib_module_names}
    tops = {t for t in tops if t in owners}  # extension-module internals (cython_runtime, ...) have no owner
    assert _distributions(tops) - set(kit.KIT) - kit.DEVICE_PACKAGES == set()


# ----------------------------------------------------------------------------------------- the session script


def test_session_script_parses_and_its_training_overrides_are_valid_config_keys():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    p = subprocess.run(["bash", str(SCRIPT), "--print-overrides"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    overrides = p.stdout.split()
    cfg = load_config(ROOT / "configs" / "tiny_digits.yaml", overrides)  # unknown key or bad value: ConfigError
    assert (cfg.train.steps, cfg.train.compile, cfg.data.decode) == (30, True, "gpu")
    assert (cfg.train.precision, cfg.deepspeed.zero_stage, cfg.checkpoint.every_steps) == ("bf16", 2, 30)
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0


def test_session_script_installs_the_kit_as_the_device_readme_says_and_stays_in_its_time():
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -u\n" in text
    install = "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site"
    assert f"{install} .whl/*.whl" in text
    assert "PYTHONPATH=/tmp/site:$PWD" in text and "BENCH_GPU_PARTIAL=$OUT/gpu_partial.json" in text
    assert "DEADLINE_S=${DEADLINE_S:-510}" in text and "${BENCH_S:-330}" in text and "${TRAIN_S:-180}" in text
