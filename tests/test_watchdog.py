"""The watchdog's line on expiry: which rank stopped beating in the rendezvous store, read in process against a real
TCPStore on 127.0.0.1 (the launched frozen-rank case is in test_preemption.py)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from pretrain.ports import free_port
from pretrain.train import watchdog
from pretrain.train.watchdog import Watchdog


@pytest.fixture
def store(monkeypatch):
    port = free_port()
    host = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    return host


def test_the_rank_whose_heartbeat_stopped_is_named(store, monkeypatch):
    store.add("pretrain/beat/1", 7)  # rank 1 beat, then froze
    # rank 2 beats while rank 0 waits between its two reads (in place of the sleeps: no timing involved)
    monkeypatch.setattr(watchdog.time, "sleep", lambda s: store.add("pretrain/beat/2", 1))
    dog = Watchdog(0, rank=0, world_size=3)  # 0: no watching thread, only the reads
    assert dog.silent_ranks() == "; rank 1 stopped responding (frozen or dead)"
    assert store.add("pretrain/beat/0", 0) == 3  # rank 0 kept beating while it waited


def test_without_rendezvous_variables_the_line_says_the_rank_is_unknown(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    line = Watchdog(0, rank=1, world_size=2).silent_ranks()
    assert (
        line == "; which rank stopped is not known (MASTER_ADDR and MASTER_PORT are not set, so the ranks' "
        "heartbeats are not kept)"
    )  # before: "rank 0 froze or died", a wrong accusation


def test_a_store_that_does_not_answer_names_its_host(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # nothing listens there
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)  # deepspeed's launch: rank 0 hosts the store
    assert "its host, rank 0, froze or died" in Watchdog(0, rank=1, world_size=2).silent_ranks()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # pretrain.launch / torchrun: the launcher hosts it
    assert "its host, the first node's launcher, froze or died" in Watchdog(0, rank=1, world_size=2).silent_ranks()
