"""How few-shot sets and shot counts are written (`fewshot.sets`, `fewshot.shots`, `--data`): parsed and checked
without touching the data, so a bad value stops the run before anything starts.

A set is `NAME=TRAIN[@SPLIT][|TEST[@SPLIT]]`; sets are separated by spaces or new lines:

    imagenet=/data/in1k-wds|/data/in1k-val-wds@train   cifar100=/data/c100-wds   pets=http://host/pets-wds/

TRAIN and TEST are what `data.train_shards` accepts (a folder written by `data_tools shard`, its URL, a brace
pattern) or an image folder of class folders. TRAIN's split defaults to `train`, TEST's to `val`; without TEST the
test split is TRAIN's `val` split (an image folder is sharded once with a fifth held out as `val`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pretrain.typed_config import ConfigError

NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
SPLIT = re.compile(r"^(.+)@([A-Za-z0-9_.-]+)$")


@dataclass(frozen=True)
class SetSpec:
    """One downstream set as written: where its train and test samples are."""

    name: str
    """Name in the metrics (`fewshot/<name>/<k>shot`)."""
    train: str
    """Shards (or image folder) the shots are drawn from."""
    train_split: str
    """Split of `train`."""
    test: str
    """Shards (or image folder) of the test images (`train` when no TEST was given)."""
    test_split: str
    """Split of `test`."""
    separate_test: bool
    """True when TEST was given (an image folder there is test data as a whole)."""


def _location(text: str, default_split: str, what: str) -> tuple[str, str]:
    m = SPLIT.match(text)
    path, split = (m.group(1), m.group(2)) if m else (text, default_split)
    if not path:
        raise ConfigError(f"{what}: empty location; write NAME=TRAIN[@SPLIT][|TEST[@SPLIT]]")
    return path, split


def parse_set(text: str, key: str = "fewshot.sets", default_name: str | None = None) -> SetSpec:
    """One `NAME=TRAIN[@SPLIT][|TEST[@SPLIT]]` (or, with `default_name`, a bare location). Raises ConfigError."""
    name, eq, rest = text.partition("=")
    if not eq or not NAME.match(name) or "/" in name:
        if default_name is None:
            raise ConfigError(
                f"{key}: {text!r} must look like NAME=TRAIN[@SPLIT][|TEST[@SPLIT]], e.g. cifar100=/data/c100-wds"
            )
        name, rest = default_name, text
    train_text, bar, test_text = rest.partition("|")
    train, train_split = _location(train_text, "train", key)
    test, test_split = _location(test_text, "val", key) if bar else (train, "val")
    return SetSpec(name, train, train_split, test, test_split, bool(bar))


def parse_sets(text: str, key: str = "fewshot.sets") -> list[SetSpec]:
    """Every set of a `fewshot.sets` value (empty: none). Raises ConfigError on bad syntax or repeated names."""
    sets = [parse_set(t, key) for t in text.split()]
    names = [s.name for s in sets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{key}: the set name {repeated[0]!r} is used twice; give every set its own name")
    return sets


def parse_shots(text: str, key: str = "fewshot.shots") -> tuple[int, ...]:
    """`"1,5,10,25"` -> (1, 5, 10, 25): positive, distinct, in ascending order. Raises ConfigError."""
    try:
        shots = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        shots = ()
    if not shots or any(k < 1 for k in shots) or list(shots) != sorted(set(shots)):
        raise ConfigError(f"{key}={text!r} must list shot counts >= 1 in ascending order, e.g. 1,5,10,25")
    return shots
