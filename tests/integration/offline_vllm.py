"""Runs vLLM's offline ``LLM`` on the test cases in a fresh process and prints what it generated.

The parity tests compare the service's engine with vLLM as it would run *without* what the project
adds. By default it keeps the plugin's attention but runs vLLM's own scheduler, which may preempt;
``--stock`` also leaves the plugin out (``VLLM_PLUGINS`` names another plugin only, so it loads in no
vLLM process). A separate process, because a process that loaded the plugin keeps it registered.

    python -m tests.integration.offline_vllm CHECKPOINT [--max-tokens T] [--repeat R] [--stock]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULT = "offline_vllm result: "
"""Marks the result line on stdout, which vLLM's own log lines share."""


def run_offline(checkpoint: Path, *flags: str) -> dict[str, Any]:
    """This module in a fresh process with ``flags`` -> its result (``{"ids", "preemptions"}``)."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.integration.offline_vllm", str(checkpoint), *flags],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith(RESULT))
    return dict(json.loads(line.removeprefix(RESULT)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--max-tokens", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=1, help="each case this many times")
    parser.add_argument("--stock", action="store_true", help="without the prefix-LM plugin")
    parser.add_argument("--kv-cache-bytes", type=int, default=2**30)
    args = parser.parse_args()
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override --kv-cache-bytes on CPU
    if args.stock:
        os.environ["VLLM_PLUGINS"] = "lora_filesystem_resolver"  # any plugin but ours
    from vllm import LLM, SamplingParams

    from tests.integration.cases import PROMPTS, images

    llm = LLM(
        model=args.checkpoint,
        dtype="float32",
        max_model_len=512,
        max_num_seqs=16,
        limit_mm_per_prompt={"image": 1},
        enforce_eager=True,
        kv_cache_memory_bytes=args.kv_cache_bytes,
        enable_chunked_prefill=False,
        enable_prefix_caching=False,
        disable_log_stats=False,  # for vllm:num_preemptions
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    prompts = [{"prompt": p, "multi_modal_data": {"image": im}} for p in PROMPTS for im in images()] * args.repeat
    outputs = llm.generate(prompts, params, use_tqdm=False)
    preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    eos = llm.get_tokenizer().eos_token_id
    ids = [[t for t in o.outputs[0].token_ids if t != eos] for o in outputs]
    print(RESULT + json.dumps({"ids": ids, "preemptions": preemptions}), flush=True)  # noqa: T201
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
