"""Training: LoRA, QLoRA and full runs with the transformers ``Trainer``, and merging what they made.

``train`` (the run), ``callbacks`` (progress, budgets, the learning curve), ``checkpoints`` (resume, snapshots),
``heldout`` (held-out scores while training, through ``finetune.evaluation``), ``merge`` (adapter into a
checkpoint the service loads), ``plot`` (learning-curve pictures). Uses ``finetune.data`` and
``finetune.evaluation``.
"""
