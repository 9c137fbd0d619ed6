"""The optional dependencies: `pip install vit-pretrain` is the light core (models, export, backbone loading,
`predict`, the shard tools); training, remote storage, fine-tuning and the demo each come with an extra of
pyproject.toml. A command that reaches a missing one stops with one line naming the extra that installs it:

    deepspeed is not installed: pip install 'vit-pretrain[train]'

It lives in data_tools, the bottom layer, so that the shard tools (remote storage) and pretrain share it. Which
extra holds a package is read from the installed metadata, i.e. pyproject.toml: there is no second list.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re

from data_tools.errors import DataToolsError

DISTRIBUTION = "vit-pretrain"
_REQUIREMENT = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)[^;]*;.*\bextra\s*==\s*['\"](?P<extra>[^'\"]+)")


class MissingExtra(DataToolsError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def extra_for(package: str) -> str | None:
    """The first extra of this distribution that lists `package` (None when none does, or when running from a
    source tree that was never installed)."""
    try:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for line in requires:
        m = _REQUIREMENT.match(line)
        if m and _canonical(m["name"]) == _canonical(package):
            return m["extra"]
    return None


def require(module: str, package: str | None = None) -> None:
    """Raise MissingExtra unless the top-level `module` can be imported (`package`: its name on PyPI, when not
    `module`). Nothing is imported here."""
    if importlib.util.find_spec(module) is not None:
        return
    package = package or module
    extra = extra_for(package)
    fix = f"pip install '{DISTRIBUTION}[{extra}]'" if extra else f"pip install {package}"
    raise MissingExtra(f"{package} is not installed: {fix}")
