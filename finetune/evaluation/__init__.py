"""Evaluation: a model scored through the service's own engines, on data it never saw.

``evaluate`` (generation through an Engine, the report), ``metrics`` (COCO mAP, VQA accuracy), ``segments``
(mask IoU and mask mAP, decoded as ``/segment`` decodes), ``pictures`` (side-by-side comparison pictures),
``compare`` (base against finetuned), ``served`` (one model served several ways, one table). Uses
``finetune.data``; never trains.
"""
