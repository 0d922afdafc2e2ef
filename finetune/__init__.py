"""Finetuning PaliGemma: datasets, LoRA/QLoRA/full training, merging and evaluation."""
