"""vLLM's CPU backend loads the tiny checkpoint and generates (the real engine, no mock)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.vllm


def test_vllm_loads_and_generates(varied_checkpoint: Path) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(varied_checkpoint),
        dtype="float32",
        max_model_len=256,
        max_num_seqs=4,
        limit_mm_per_prompt={"image": 1},
        enforce_eager=True,
    )
    try:
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 160, 3), dtype=np.uint8))
        params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=1, skip_special_tokens=False)
        (out,) = llm.generate([{"prompt": "detect red circle", "multi_modal_data": {"image": image}}], params)
        completion = out.outputs[0]
        assert len(completion.token_ids) == 8
        assert len(completion.logprobs) == 8
        image_id = llm.get_tokenizer().convert_tokens_to_ids("<image>")
        assert out.prompt_token_ids.count(image_id) == 64  # (112 / 14) ** 2 image tokens
        assert len(set(completion.token_ids)) > 1  # the varied weights do not repeat one token
    finally:
        llm.llm_engine.engine_core.shutdown()
