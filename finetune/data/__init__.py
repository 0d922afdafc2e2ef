"""Data: where training examples come from.

``records`` (what a dataset is made of, bad-record issues), ``loaders`` (COCO detection, big_vision JSONL,
VQA JSONL), ``segments`` (COCO instance masks to ``<seg>`` targets), ``examples`` (records to prompts and
targets), ``images`` (checked decoding, the processor's resize), ``collate`` (examples to batches), ``synth``
(the synthetic shapes sets). Imports nothing else of ``finetune`` but ``config``.
"""
