"""Shared session fixtures: real small datasets made offline (scikit-learn digits and sample photos) and shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_tools.digits import write_digits, write_photos
from data_tools.shard import shard

DIGITS_VAL_PER_CLASS = 5
DIGITS_SAMPLES_PER_SHARD = 200


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """Image folder from `data_tools digits`: 1,797 32x32 RGB PNGs in class folders "0".."9"."""
    return write_digits(tmp_path_factory.mktemp("digits") / "digits")


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory, digits_dir) -> Path:
    """Digits as shards: 5 val samples per class (val-000000.tar), 200-sample train shards (9 of them, the last
    holding 147), seed 0, original PNG bytes kept. The folder holds `_info.json` (timm layout + class_names)."""
    out = tmp_path_factory.mktemp("digits_shards") / "shards"
    shard(
        digits_dir,
        out,
        workers=1,
        samples_per_shard=DIGITS_SAMPLES_PER_SHARD,
        val_per_class=DIGITS_VAL_PER_CLASS,
        seed=0,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    """Image folder of 30 realistic JPEGs (500x375 or 375x500 crops of scikit-learn's sample photos) in 3 classes
    `class_0`..`class_2`, 10 each."""
    return write_photos(tmp_path_factory.mktemp("photos") / "photos", classes=3, per_class=10)


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left(tmp_path_factory):
    """Fails the session if a launch of ours left a DeepSpeed all-reduce buffer in /dev/shm (and removes it).

    Every launch records the name of the buffer it will create in the ledger folder named by `PRETRAIN_SHM_LEDGER`
    (`pretrain.train.shm.install`, inherited through the launchers' environment); buffers of other sessions or
    users on the machine are not ours to judge."""
    import os

    from pretrain.train import shm

    ledger = tmp_path_factory.mktemp("shm_ledger")
    os.environ[shm.LEDGER_ENV] = str(ledger)
    yield
    del os.environ[shm.LEDGER_ENV]
    recorded = [n for n in os.listdir(ledger) if (shm.SHM_DIR / n).exists()]
    left = sorted(set(recorded) - shm.held_names())  # our launches have ended; a live holder is another session
    shm.remove_orphans(shm.SHM_DIR / n for n in left)  # reported below, and not left behind
    assert not left, f"launches of this session left shared memory in {shm.SHM_DIR}: {left}"
