"""``assert_vllm_generates(checkpoint)``: vLLM (offline ``LLM``, CPU) loads a checkpoint the project wrote and
generates from it. For tests whose point is that a saved model is servable, not what it answers."""

from __future__ import annotations

from pathlib import Path


def assert_vllm_generates(checkpoint: Path) -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(checkpoint), dtype="float32", max_model_len=256, max_num_seqs=2,
        limit_mm_per_prompt={"image": 1}, enforce_eager=True,
    )  # fmt: skip
    try:
        image = Image.new("RGB", (112, 112), (30, 30, 30))
        params = SamplingParams(temperature=0.0, max_tokens=4, skip_special_tokens=False)
        (result,) = llm.generate([{"prompt": "detect circle", "multi_modal_data": {"image": image}}], params)
        assert len(result.outputs[0].token_ids) >= 1
    finally:
        llm.llm_engine.engine_core.shutdown()
