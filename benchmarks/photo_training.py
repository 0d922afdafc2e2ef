"""Training on photo-sized JPEGs: peak memory and speed of one epoch, against the number of photos.

    .venv/bin/python benchmarks/photo_training.py [--photos 100,300] [--workers 0,1] [--before /tmp/old]

Each row is one epoch of LoRA (batch size 10) on the tiny checkpoint over the first N of 300 synthetic
1920x1080 JPEGs (``finetune.data.synth.generate_photos``, ~630 KB each, made once into ``artifacts/photos``),
run as ``python -m finetune train`` in a fresh interpreter (``tests/finetune/photo_runs.py``). Peak RSS is
the training process's ``ru_maxrss``; ``worker`` is its largest DataLoader worker's. ``--before DIR`` adds
the same rows for another tree (a clone at an older commit) run with this virtual environment::

    git clone /work/main /tmp/old && git -C /tmp/old checkout a15169d

Steps/s counts training time only (``train_result.json``). Compare rows of one run: the machine is shared.
"""

# ruff: noqa: T201  (a command-line benchmark: the table goes to stdout)
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the measured run lives in the tests package
from finetune.data.synth import generate_cached  # noqa: E402
from tests.finetune.photo_runs import Run, train_epoch  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=_ints, default=[100, 300], help="photo counts, comma-separated")
    parser.add_argument("--workers", type=_ints, default=[0, 1], help="DataLoader workers, comma-separated")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--before", type=Path, default=None, help="another tree to run the same rows on")
    parser.add_argument("--data", type=Path, default=ROOT / "artifacts" / "photos")
    args = parser.parse_args()

    photos = generate_cached(args.data, max(300, *args.photos), photos=True)
    trees = [("after", ROOT)] + ([("before", args.before.resolve())] if args.before else [])
    rows: list[tuple[str, Run]] = []
    with tempfile.TemporaryDirectory(prefix="photo-training-") as tmp:
        from paligemma.checkpoint import build_tiny_checkpoint

        base = build_tiny_checkpoint(Path(tmp) / "tiny", seed=0)
        for label, tree in trees:
            for workers in args.workers:
                for n in args.photos:
                    out = Path(tmp) / f"{label}-{workers}-{n}"
                    run = train_epoch(tree, base, photos, n, out, workers=workers, batch_size=args.batch_size)
                    rows.append((label, run))
                    print(f"{label} {n} photos, {workers} workers: {run}", file=sys.stderr)
    print("| code | photos | workers | peak RSS (MiB) | worker peak (MiB) | steps | seconds | steps/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in rows:
        worker = f"{r.worker_peak_rss_mib:.0f}" if r.workers else "-"
        print(
            f"| {label} | {r.photos} | {r.workers} | {r.peak_rss_mib:.0f} | {worker} | {r.steps} | {r.seconds:.1f} "
            f"| {r.steps_per_s:.2f} |"
        )


if __name__ == "__main__":
    main()
