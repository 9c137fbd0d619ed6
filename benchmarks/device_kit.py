"""Wheels for a lent GPU machine: the packages its image lacks for the GPU benchmark and a 1-GPU DeepSpeed run.

    python -m benchmarks.device_kit [--dest .whl]

The machine (one H200, Python 3.12, its own torch / torchvision / timm, no network) gets them as wheels in `.whl/`,
an ignored folder that the device tool's `run` carries (`carry: [".whl"]`); `benchmarks/gpu_session.sh` installs
them there with `pip install --no-index --no-deps --target /tmp/site`. What is carried is `KIT`; the versions are
constraints.txt's; what the image already holds is `DEVICE_PACKAGES` (tests/test_device_kit.py checks that every
package our GPU entry points import is in one of the two). DeepSpeed publishes only an sdist: its pure wheel is
built here (DS_BUILD_OPS=0: its ops JIT-compile on the machine). Idempotent: wheels already in DEST are kept, other
versions and wheels of no kit package are removed. Fails (exit 2, one line) when the wheels plus the working tree
would not fit in what one `run` carries.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
DEVICE_PYTHON = "3.12"  # the machine's python3 (/opt/torch/.venv/bin/python3)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
LIMIT_BYTES = 60 * 2**20  # the tool carries 64 MiB (working tree + carried paths); keep some room
# What the device image lacks, and who needs it. Versions: constraints.txt.
KIT: dict[str, str] = {
    "webdataset": "pretrain.data, data_tools.shard",
    "braceexpand": "pretrain.data.shards, webdataset",
    "deepspeed": "pretrain.train (built here from its sdist)",
    "hjson": "deepspeed",
    "pydantic": "deepspeed's config",
    "pydantic-core": "pydantic",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
    "typing-extensions": "pydantic needs >= 4.16 (its Requires-Dist); the image's own version is not known",
}
SDIST_ONLY = frozenset({"deepspeed"})  # no wheel on PyPI: built here
# Imported by our code, but only on paths the GPU session does not take.
NOT_NEEDED: dict[str, str] = {
    "boto3": "s3:// shards (data_tools.storage)",
    "botocore": "s3:// and http(s):// shards (data_tools.storage)",
    "wandb": "log.wandb=true",
}
# The device image's Python packages (/work/.library/device/KINDS.md, "Python packages already there", 2026-11-17).
DEVICE_PACKAGES = frozenset(
    """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
    llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
    multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
    nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
    nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
    patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
    py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
    pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
    safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
    tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
    torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
    uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
    """.split()
)


class KitError(Exception):
    """A problem the user can fix; `main` prints it as one line and exits 2."""


def canonical(name: str) -> str:
    """The PEP 503 normal form of a distribution name: "PyYAML" -> "pyyaml", "pydantic_core" -> "pydantic-core"."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_constraints(text: str) -> dict[str, str]:
    """`name==version` lines of a constraints file -> {canonical name: version}.

    Comments, blank lines and environment markers are skipped. Raises KitError on a line that pins nothing.
    """
    pins = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*([^\s=]+)", line)
        if not m:
            raise KitError(f"constraints.txt line {n} is not name==version: {raw.strip()!r}")
        pins[canonical(m.group(1))] = m.group(2)
    return pins


def kit_pins(pins: dict[str, str], kit: dict[str, str] = KIT) -> dict[str, str]:
    """{package: version} for every kit package, from the constraints' pins. Raises KitError if one is not pinned."""
    missing = [name for name in kit if canonical(name) not in pins]
    if missing:
        raise KitError(f"{', '.join(missing)} not pinned in constraints.txt; pin it there (name==version)")
    return {name: pins[canonical(name)] for name in kit}


def download_args(python: str, name: str, version: str, dest: Path) -> list[str]:
    """The `pip download` command of one binary wheel for the device's Python and platform (no dependencies)."""
    args = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", DEVICE_PYTHON]
    args += ["--implementation", "cp"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return [*args, "-d", str(dest), "-q", f"{name}=={version}"]


def sdist_args(python: str, name: str, version: str, work: Path) -> list[str]:
    """The `pip download` command of a package's sdist into `work` (metadata prepared with this Python's torch)."""
    args = [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-q"]
    return [*args, "-d", str(work), f"{name}=={version}"]


def wheel_build_args(python: str, sdist: Path, dest: Path) -> list[str]:
    """The `pip wheel` command that builds a pure wheel from `sdist` into `dest` with this Python (and its torch);
    run it with `build_env()`."""
    return [python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), str(sdist)]


def build_env(environ: dict[str, str]) -> dict[str, str]:
    """The environment of the sdist build: no ops compiled (they JIT there), CUDA's op builders (the device's)."""
    return {**environ, "DS_BUILD_OPS": "0", "DS_ACCELERATOR": "cuda"}


def wheel_name_version(filename: str) -> tuple[str, str] | None:
    """("pydantic-core", "2.50.4") from "pydantic_core-2.50.4-cp312-cp312-manylinux_2_17_x86_64.whl"; None if
    the name is not a wheel's."""
    parts = filename.removesuffix(".whl").split("-")
    if not filename.endswith(".whl") or len(parts) not in (5, 6):
        return None
    return canonical(parts[0]), parts[1]


def plan(present: list[str], wanted: dict[str, str]) -> tuple[dict[str, str], list[str], list[str]]:
    """What to do in DEST: (to fetch {name: version}, wheel files to keep, wheel files to remove).

    A present wheel of a wanted name and version is kept (idempotence); every other wheel, another version of a
    kit package or no kit package at all, is removed, so that DEST holds one version of each and nothing else.
    """
    want = {canonical(n): (n, v) for n, v in wanted.items()}
    keep, remove, have = [], [], set()
    for f in sorted(present):
        nv = wheel_name_version(f)
        if nv is not None and nv[0] in want and nv[1] == want[nv[0]][1] and nv[0] not in have:
            keep.append(f)
            have.add(nv[0])
        else:
            remove.append(f)
    fetch = {n: v for c, (n, v) in want.items() if c not in have}
    return fetch, keep, remove


def size_problem(wheel_bytes: int, tree_bytes: int, limit: int = LIMIT_BYTES) -> str | None:
    """One line saying the kit does not fit in one `run` beside the working tree; None when it fits."""
    total = wheel_bytes + tree_bytes
    if total <= limit:
        return None
    return (
        f"wheels {mib(wheel_bytes)} + working tree {mib(tree_bytes)} = {mib(total)} exceeds {mib(limit)}, "
        "what one run carries; drop a wheel or shrink the tree"
    )


def mib(n: int) -> str:
    """Bytes as "1.23 MiB"."""
    return f"{n / 2**20:.2f} MiB"


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what the device tool sends: tracked files and untracked files that git does not ignore."""
    try:
        p = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        raise KitError(f"cannot list the working tree with git ({e}); run in a git checkout") from None
    files = (root / f for f in p.stdout.decode().split("\0") if f)
    return sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink())


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        last = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-1]
        raise KitError(f"pip {cmd[3]} {cmd[-1]} failed (exit {p.returncode}): {last}")


def fetch(name: str, version: str, dest: Path) -> None:
    """Put the device wheel of `name==version` into `dest`: downloaded, or built from the sdist (SDIST_ONLY)."""
    if name not in SDIST_ONLY:
        _run(download_args(sys.executable, name, version, dest))
        return
    try:
        import torch  # noqa: F401 - DeepSpeed's setup.py imports it
    except ImportError:
        raise KitError(f"building {name}'s wheel needs torch in this Python; run .venv/bin/python -m ...") from None
    env = build_env(dict(os.environ))
    with tempfile.TemporaryDirectory(prefix="device_kit-") as work:
        _run(sdist_args(sys.executable, name, version, Path(work)), env=env)
        sdists = sorted(Path(work).glob("*.tar.gz"))
        if len(sdists) != 1:
            raise KitError(f"pip download of {name}=={version}'s sdist left {[s.name for s in sdists]}, not one")
        _run(wheel_build_args(sys.executable, sdists[0], dest), env=env)


def make_kit(dest: Path) -> list[Path]:
    """Fill `dest` with exactly the kit's wheels; returns them, sorted. Raises KitError."""
    wanted = kit_pins(parse_constraints(CONSTRAINTS.read_text()))
    dest.mkdir(parents=True, exist_ok=True)
    to_fetch, _, remove = plan([f.name for f in dest.glob("*.whl")], wanted)
    for f in remove:
        print(f"removed {f} (not in the kit, or another version)")
        (dest / f).unlink()
    for name, version in to_fetch.items():
        print(f"fetching {name}=={version} ...", flush=True)
        fetch(name, version, dest)
    left, kept, extra = plan([f.name for f in dest.glob("*.whl")], wanted)
    if left or extra:
        raise KitError(f"{dest} does not hold exactly the kit: missing {sorted(left)}, unexpected {extra}")
    return [dest / f for f in kept]


def main(argv: list[str] | None = None) -> int:
    """Make the kit, print each wheel and the total; exit 2 with one line on a problem."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.device_kit", description=__doc__.splitlines()[0])
    p.add_argument("--dest", type=Path, default=ROOT / ".whl", help="folder of the wheels (default: .whl)")
    args = p.parse_args(argv)
    try:
        wheels = make_kit(args.dest)
        total, tree = sum(w.stat().st_size for w in wheels), tree_bytes()
        for w in wheels:
            print(f"  {w.name:<80} {mib(w.stat().st_size):>10}")
        print(f"{len(wheels)} wheels, {mib(total)}; with the working tree ({mib(tree)}): {mib(total + tree)}")
        problem = size_problem(total, tree)
        if problem:
            raise KitError(problem)
    except (KitError, OSError) as e:
        print(f"device_kit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
