"""Model definitions: the ViT (`vit.py`) and its variants (`specs.py`). No data, DeepSpeed or distributed code."""
