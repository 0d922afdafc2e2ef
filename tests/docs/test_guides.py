"""The guides' commands run as written: every ```` ```bash runnable ```` block of each guide, in order.

Each guide gets one fresh temporary working directory; its blocks run one after another in it (so a block
sees the files earlier blocks wrote), each with ``bash -euo pipefail``. The environment is the one a reader
has after ``source .venv/bin/activate`` in the repository: the venv's ``bin`` first on ``PATH`` (so
``python`` is the project's), ``HF_HUB_OFFLINE=1``, ``REPO`` pointing at the checkout and ``PORT`` set to a
free port for blocks that start the service. A failing block fails the test with its command and output.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUIDES = tuple(
    str(page.relative_to(REPO))
    for page in sorted((REPO / "docs").glob("*.md"))
    if "```bash runnable" in page.read_text()
)
"""Every docs page with a runnable block (blocks that need a GPU, a download or minutes of training are not marked)."""
BLOCK = re.compile(r"^```bash runnable[^\n]*\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)
BLOCK_TIMEOUT_S = 300


def runnable_blocks(markdown: str) -> list[str]:
    """The bodies of the ```` ```bash runnable ```` fenced blocks, in document order."""
    return [match.group(1) for match in BLOCK.finditer(markdown)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        REPO=str(REPO),
        PORT=str(_free_port()),
        PYTHONPATH=str(REPO),
    )
    env.pop("PALIGEMMA_MODEL", None)
    return env


def test_block_extraction_keeps_order_and_skips_plain_blocks() -> None:
    text = "```bash\nnot me\n```\n```bash runnable\necho one\n```\ntext\n```bash runnable\necho two\n```\n"
    assert runnable_blocks(text) == ["echo one\n", "echo two\n"]


def test_the_guides_are_found() -> None:
    assert {"docs/how-paligemma-works.md", "docs/finetune-guide.md", "docs/architecture.md"} <= set(GUIDES)


def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    links = [
        (page, target)
        for page in pages
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)|src=\"([^\"]+)\"", page.read_text())
        for target in target
        if target and not target.startswith(("http://", "https://", "mailto:"))
    ]
    assert len(links) > 20
    missing = [f"{page.relative_to(REPO)} -> {target}" for page, target in links if not (page.parent / target).exists()]
    assert missing == []


@pytest.mark.slow
@pytest.mark.parametrize("guide", GUIDES)
def test_guide_blocks_run_as_written(guide: str, tmp_path: Path) -> None:
    blocks = runnable_blocks((REPO / guide).read_text())
    assert blocks, f"{guide} has no runnable blocks"
    env = _environment()
    for number, block in enumerate(blocks, 1):
        started = time.monotonic()
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
        )
        took = time.monotonic() - started
        assert result.returncode == 0, (
            f"{guide} block {number} exited {result.returncode} after {took:.0f}s\n--- block ---\n{block}"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
        )
