"""The detection grammar inside vLLM: a per-request logits processor (``--logits-processors``).

vLLM loads this class in its engine process (the engine passes its qualified name); a request carries
its grammar as plain data in ``SamplingParams.extra_args[GRAMMAR_KEY]`` (:meth:`GrammarSpec.to_dict`).
Each step, the request's :class:`~paligemma.grammar.DetectionGrammar` takes the tokens generated since
the last step and every token it does not allow gets ``-inf``. vLLM computes the reported logprobs before
logits processors run (``logprobs_mode="raw_logprobs"``), so scores are the model's raw probabilities, as
on the transformers engine.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from paligemma.grammar import DetectionGrammar, GrammarSpec
from service.engines.vllm_plugin import GRAMMAR_KEY


class _RowGrammar:
    """One request's grammar, fed the request's output ids (vLLM passes the live list) each step."""

    def __init__(self, spec: GrammarSpec) -> None:
        self._grammar = DetectionGrammar(spec)
        self._seen = 0

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        for token in output_ids[self._seen :]:
            self._grammar.advance(int(token))
        self._seen = len(output_ids)
        return logits if self._grammar.done else self._grammar.mask(logits)


class DetectionGrammarProcessor(AdapterLogitsProcessor):
    """vLLM's wrapper for per-request processors, building one :class:`_RowGrammar` per constrained request."""

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token greedy decoding picks

    def new_req_logits_processor(self, params: Any) -> _RowGrammar | None:
        spec = (params.extra_args or {}).get(GRAMMAR_KEY)
        return _RowGrammar(GrammarSpec.from_dict(spec)) if spec is not None else None
