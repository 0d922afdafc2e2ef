"""Finetuning PaliGemma: datasets, LoRA/QLoRA/full training, merging and evaluation.

Four rooms, each importing only those before it (``tests/test_layout.py``):

- ``data/``: where training examples come from (loaders, masks to ``<seg>`` targets, prompts, images, batches,
  the synthetic shapes);
- ``evaluation/``: scores through the service's own engines (mAP, VQA accuracy, mask IoU, pictures);
- ``training/``: the Trainer run, held-out scores while it runs (through ``evaluation``), merging;
- ``recipes/``: the step-bounded runs that made the shipped models, and their cards.

``config`` (the commands' dataclass configs) and ``options`` (those configs as argparse flags) sit below
all four; ``__main__`` (``python -m finetune``) above them.
"""
