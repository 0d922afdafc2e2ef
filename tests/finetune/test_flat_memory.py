"""Flat memory on photo datasets: one epoch over 300 photo-sized JPEGs peaks within 300 MB of one over 100.

Real processes (``tests/finetune/photo_runs.py``). With the old decoded-image cache, the 300-photo run
peaked 1.6 GiB above the 100-photo one (3089 vs 1494 MiB; 6 MB per decoded 1080p photo); the bound
here is 300 MB.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.data.synth import generate_cached
from tests.finetune.photo_runs import train_epoch

ROOT = Path(__file__).resolve().parents[2]
LIMIT_MIB = 300


@pytest.fixture(scope="session")
def photos(request: pytest.FixtureRequest) -> Path:
    """300 photo-sized JPEGs (1920x1080, ~630 KB each), kept in pytest's cache between sessions."""
    return generate_cached(request.config.cache.mkdir("finetune-photos"), 300, photos=True)


@pytest.mark.slow
def test_one_epoch_of_300_photos_peaks_like_100(tiny_checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    small = train_epoch(ROOT, tiny_checkpoint, photos, 100, tmp_path / "100")
    large = train_epoch(ROOT, tiny_checkpoint, photos, 300, tmp_path / "300")
    assert (small.steps, large.steps) == (10, 30)
    growth = large.peak_rss_mib - small.peak_rss_mib
    assert growth < LIMIT_MIB, f"peak RSS {small.peak_rss_mib:.0f} MiB (100 photos) -> {large.peak_rss_mib:.0f} MiB"
