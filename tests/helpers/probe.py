"""A dataset that reports what its DataLoader worker sees: its environment variable and working folder."""

from __future__ import annotations

import os

from torch.utils.data import IterableDataset


class EnvProbe(IterableDataset):
    """Yields (value of environment variable `name`, the working folder) once, from inside the worker."""

    def __init__(self, name: str):
        self.name = name

    def __iter__(self):
        yield os.environ.get(self.name), os.getcwd()
