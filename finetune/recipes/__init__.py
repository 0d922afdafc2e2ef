"""Recipes: the step-bounded runs that made the shipped models, and their cards.

``demo`` (``models/demo`` from scratch), ``transfer`` (the LoRA adapter ``models/demo-diamond``),
``segment_demo`` (``models/demo-segment``), ``mask_codebook`` (``models/shapes-vae``), ``card`` (model cards,
written from the plain report data a recipe hands over). The top room: uses every other one, nothing
imports it but the CLI.
"""
