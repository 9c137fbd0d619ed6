"""The demo's downstream half: export the pretrained run, load it in timm, torchvision and Hugging Face
transformers and check they agree with this project's model, then fine-tune the backbone with accelerate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from pretrain.downstream.backbone import load_backbone
from pretrain.downstream.finetune import finetune
from pretrain.export import export_checkpoint


def sample_images(digits: Path, mean: tuple[float, ...], std: tuple[float, ...], n: int = 8) -> torch.Tensor:
    """A batch of real digits from the image folder, normalised as in training: (n, 3, 32, 32) float32."""
    every = sorted(digits.glob("*/*.png"))
    files = every[:: max(1, len(every) // n)][:n]  # spread over the classes (folders sort by class)
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (x.float() / 255 - m) / s


def check_libraries(run: Path, exports: Path, digits: Path) -> dict[str, float]:
    """Export in every format; the largest |logit difference| of each library's model against ours."""
    import timm
    import torchvision
    from transformers import ViTForImageClassification

    for fmt in ("timm", "torchvision", "hf"):
        export_checkpoint(run, exports / fmt, fmt)
    ours = load_backbone(exports / "timm")
    model = ours.model.eval()
    x = sample_images(digits, ours.mean, ours.std)
    tv_cfg = json.loads((exports / "torchvision" / "config.json").read_text())
    tv = torchvision.models.VisionTransformer(**tv_cfg["vision_transformer_args"])
    tv.load_state_dict(load_file(exports / "torchvision" / "model.safetensors"), strict=True)
    others = {
        "timm": timm.create_model(f"local-dir:{exports / 'timm'}", pretrained=True),
        "torchvision": tv,
        "transformers": ViTForImageClassification.from_pretrained(exports / "hf"),
    }
    diffs = {}
    with torch.no_grad():
        ref = model(x)
        for name, m in others.items():
            out = m.eval()(x)
            out = out.logits if hasattr(out, "logits") else out
            diffs[name] = (out - ref).abs().max().item()
    return diffs


def finetune_compare(run: Path, exports: Path, shards: Path, steps: int) -> dict[str, float]:
    """Fine-tune the exported backbone (head dropped) and the same model from scratch, same steps and seed."""
    export_checkpoint(run, exports / "backbone", "timm", head="drop")
    common = dict(data=str(shards), steps=steps, batch_size=32, lr=0.03, workers=1, seed=0, progress=False)
    tuned = finetune(weights=str(exports / "backbone"), out=str(exports / "finetuned"), **common)
    scratch = finetune(model="vit_test_patch4", img_size=32, **common)
    return {"finetuned": tuned["top1"], "scratch": scratch["top1"]}
