"""PaliGemma's text format: task prompts, the ``<locNNNN>``/``<segNNN>`` codec, checkpoints.

Imports nothing heavy: ``paligemma.checkpoint`` loads transformers only when called.
"""

from paligemma.parsing import Detection, parse_detection_token_ids, parse_detections, score_from_logprobs
from paligemma.prompts import PromptError
from paligemma.tokens import LOC_MAX, SpecialIds, encode_box, encode_detections

__all__ = [
    "LOC_MAX",
    "Detection",
    "PromptError",
    "SpecialIds",
    "encode_box",
    "encode_detections",
    "parse_detection_token_ids",
    "parse_detections",
    "score_from_logprobs",
]
