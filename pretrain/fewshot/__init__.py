"""Few-shot linear evaluation of a frozen ViT, as in the ViT paper and big_vision's `fewshot_lsr` evaluator.

spec.py      how sets and shot counts are written (config `fewshot.sets`, `--data`)
sets.py      a set's shards and classes, the pool's labels, the seeded k-shot draw
features.py  the frozen representation of chosen samples on every rank, gathered to rank 0
ridge.py     the closed-form ridge fit to ±1 targets in float64, the L2 weight chosen on held-out shots
evaluate.py  `FewShot` (sets -> results) and `FewShotEvaluator`, the Trainer's part
__main__.py  `python -m pretrain.fewshot --weights EXPORT --data SET ...`
"""
