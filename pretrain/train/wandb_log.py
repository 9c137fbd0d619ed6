"""Weights & Biases logging (optional: `pip install 'vit-pretrain[wandb]'`, checked by `metrics.check_loggers`),
rank 0 only: the same metrics as TensorBoard, under the same names (`train/loss`, `eval/top1`, ...), and the
resolved config of the run.

`WANDB_MODE=offline` writes the run under `output_dir/wandb/` without a network (`wandb sync` uploads it later).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pretrain.config import LogConfig


class WandbLogger:
    """One W&B run; `log` takes the same values as the TensorBoard writer."""

    def __init__(self, log: LogConfig, output_dir: Path, run_name: str) -> None:
        import wandb

        config_file = output_dir / "config.yaml"  # the resolved config rank 0 wrote before building the model
        self.run = wandb.init(
            project=log.wandb_project,
            entity=log.wandb_entity or None,
            name=log.wandb_name or run_name,
            tags=[t.strip() for t in log.wandb_tags.split(",") if t.strip()],
            config=yaml.safe_load(config_file.read_text()) if config_file.is_file() else {},
            dir=str(output_dir),
        )

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        scalars = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, int | float)}
        self.run.log(scalars, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() returns before W&B's service process has written the run's last records to
        # `run-*.wandb` (seen with wandb 0.31 offline); teardown waits for that process to end.
        wandb.teardown()
