"""Training images: every bad-image case made for real on disk, through the header check, the loaders (skip
and fail), the dataset (decode-time failures), the processor's resize and the command line."""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import PaliGemmaProcessor

from finetune.data.collate import ExampleDataset
from finetune.data.images import BadImage, inspect_image, load_training_image
from finetune.data.loaders import load_coco, load_jsonl, load_vqa
from finetune.data.records import DataError, Example, data_error_message
from finetune.data.synth import generate_photos

ROOT = Path(__file__).resolve().parents[2]
TRUNCATED = "the image data is truncated or corrupt"


def _huge_png(path: Path, side: int = 30_000) -> None:
    """An 8x8 PNG whose IHDR (with a valid CRC) declares ``side`` x ``side``: a decompression bomb's header
    without allocating its pixels."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two good photos, and one file per bad or special case, under ``images/``."""
    root = generate_photos(tmp_path_factory.mktemp("images"), 2, width=640, height=360)
    d = root / "images"
    data = (d / "000000.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])  # the header is intact, the pixels are not
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("not an image\n")
    Image.new("RGB", (8, 8)).save(d / "photo.tiff")
    _huge_png(d / "huge.png")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(d / "cmyk.jpg", quality=95)  # red
    Image.fromarray(np.full((16, 16), 40_000, dtype=np.uint16)).save(d / "gray16.png")
    stored = Image.new("RGB", (64, 32), (220, 30, 30))
    stored.paste((30, 30, 220), (32, 0, 64, 32))  # stored: left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored turned 90 degrees clockwise: left half -> top half
    stored.save(d / "rotated.jpg", exif=exif.tobytes(), quality=95)
    return root


BAD = {
    "empty.jpg": "the image is empty",
    "text.jpg": "the image could not be decoded",
    "photo.tiff": "image format not supported",
    "huge.png": "image has more than 89478485 pixels",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_header_check_names_the_reason(images: Path, name: str) -> None:
    with pytest.raises(BadImage, match=re.escape(BAD[name])) as caught:
        inspect_image(images / "images" / name)
    assert caught.value.path.endswith(name)


def test_header_check_reads_the_displayed_size_and_passes_a_truncated_file(images: Path) -> None:
    d = images / "images"
    assert tuple(inspect_image(d / "rotated.jpg")) == (32, 64, 6)  # stored 64x32, displayed 32x64
    assert tuple(inspect_image(d / "000000.jpg")) == (640, 360, 1)
    assert tuple(inspect_image(d / "truncated.jpg")) == (640, 360, 1)  # only decoding finds it
    with pytest.raises(DataError, match=re.escape(f"{d / 'truncated.jpg'}: {TRUNCATED}")):
        load_training_image(d / "truncated.jpg")


def test_special_images_decode_to_the_right_rgb(images: Path) -> None:
    d = images / "images"
    cmyk = load_training_image(d / "cmyk.jpg")
    assert cmyk.mode == "RGB" and np.allclose(_rgb(cmyk, 16, 16), (255, 0, 0), atol=12)
    gray = load_training_image(d / "gray16.png")
    assert gray.getpixel((8, 8)) == (155, 155, 155)  # 40000 / 257, not clipped to 255
    rotated = load_training_image(d / "rotated.jpg")
    assert rotated.size == (32, 64)
    assert np.allclose(_rgb(rotated, 16, 8), (220, 30, 30), atol=20)  # red on top
    assert np.allclose(_rgb(rotated, 16, 56), (30, 30, 220), atol=20)


def _rgb(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image)[y, x])


def _coco(images: Path, names: list[str], sizes: dict[str, tuple[int, int]]) -> Path:
    shape = [sizes.get(n, (640, 360)) for n in names]
    records = [
        {"id": i, "file_name": f"images/{n}", "width": shape[i][0], "height": shape[i][1]} for i, n in enumerate(names)
    ]
    anns = [{"id": i + 1, "image_id": i, "category_id": 1, "bbox": [1, 1, 8, 8]} for i in range(len(names))]
    path = images / f"coco-{len(names)}-{len(sizes)}.json"
    path.write_text(json.dumps({"images": records, "annotations": anns, "categories": [{"id": 1, "name": "box"}]}))
    return path


def test_coco_reports_each_bad_image_and_a_rotated_record(images: Path) -> None:
    names = ["000000.jpg", *sorted(BAD), "rotated.jpg", "truncated.jpg"]
    path = _coco(images, names, {"rotated.jpg": (64, 32)})  # annotated in its stored orientation
    data = load_coco(path, on_error="skip")
    assert [im.path.name for im in data.images] == ["000000.jpg", "truncated.jpg"]
    for name, reason in BAD.items():
        assert any(f"bad image {images / 'images' / name}: {reason}" in str(i) for i in data.issues), name
    (rotated,) = [str(i) for i in data.issues if "rotated.jpg" in str(i)]
    assert "displayed as 32x64 (EXIF orientation 6) but the record says 64x32" in rotated
    assert rotated.startswith(f"{path}:images[5] (id 5): image {images / 'images' / 'rotated.jpg'} is displayed")
    assert len(data.issues) == len(BAD) + 1

    upright = load_coco(_coco(images, ["rotated.jpg"], {"rotated.jpg": (320, 640)}), on_error="fail")
    assert [im.path.name for im in upright.images] == ["rotated.jpg"]  # displayed shape, scaled: fine
    with pytest.raises(DataError, match=re.escape(f"bad image {images / 'images' / 'empty.jpg'}: the image is")):
        load_coco(path, on_error="fail")


@pytest.mark.parametrize("kind", ["jsonl", "vqa"])
def test_jsonl_and_vqa_report_bad_images(images: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    names = ["000000.jpg", "empty.jpg", "huge.png", "empty.jpg", "000001.jpg"]
    if kind == "jsonl":
        lines = [{"image": f"images/{n}", "prefix": "caption en", "suffix": "a photo"} for n in names]
    else:
        lines = [{"image": f"images/{n}", "question": "what is it?", "answer": "a photo"} for n in names]
    path = images / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    load = load_jsonl if kind == "jsonl" else load_vqa
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        kept = load(path, on_error="skip")
    assert [r.image.name for r in kept] == ["000000.jpg", "000001.jpg"]
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 3 and f"{path}:line 2: bad image {images / 'images' / 'empty.jpg'}" in logged[0]
    assert "line 3: bad image" in logged[1] and "huge.png: image has more than" in logged[1]
    with pytest.raises(DataError, match=re.escape(f"{path}:line 2: bad image")):
        load(path, on_error="fail")


def _examples(images: Path, names: list[str]) -> list[Example]:
    return [Example(images / "images" / n, f"caption {n}", "a photo") for n in names]


def test_dataset_substitutes_the_next_example_for_a_bad_image(images: Path, caplog: pytest.LogCaptureFixture) -> None:
    dataset = ExampleDataset(_examples(images, ["000000.jpg", "truncated.jpg", "000001.jpg"]))
    with caplog.at_level(logging.WARNING, logger="finetune.data.collate"):
        first, again = dataset[1], dataset[1]
    assert first["prefix"] == again["prefix"] == "caption 000001.jpg" and first["image"].size == (640, 360)
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping bad image {images / 'images' / 'truncated.jpg'}: {TRUNCATED}"  # once per file
    ]
    wrapped = ExampleDataset(_examples(images, ["000000.jpg", "truncated.jpg"]))
    assert wrapped[1]["prefix"] == "caption 000000.jpg"  # index + 1, wrapping
    with pytest.raises(DataError, match="no readable image among the 2 examples"):
        ExampleDataset(_examples(images, ["truncated.jpg", "truncated.jpg"]))[0]
    with pytest.raises(DataError, match=re.escape(f"{images / 'images' / 'truncated.jpg'}: {TRUNCATED}")):
        ExampleDataset(_examples(images, ["000000.jpg", "truncated.jpg"]), on_error="fail")[1]


def test_a_worker_error_becomes_one_clean_line(images: Path) -> None:
    """torch re-raises a worker's DataError with the worker's traceback as its message."""
    dataset = ExampleDataset(_examples(images, ["truncated.jpg"]), on_error="fail")
    with pytest.raises(DataError) as caught:
        next(iter(DataLoader(dataset, num_workers=1, collate_fn=list)))
    assert "Traceback" in str(caught.value)
    assert data_error_message(caught.value) == f"{images / 'images' / 'truncated.jpg'}: {TRUNCATED}"
    assert data_error_message(DataError("a.json:line 3: missing image")) == "a.json:line 3: missing image"


def test_resized_image_gives_the_processors_own_pixels(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Decoding at the processor's size (112 px here) in the dataset changes no pixel value the model sees."""
    processor = PaliGemmaProcessor.from_pretrained(tiny_checkpoint)
    photo = generate_photos(tmp_path, 1) / "images" / "000000.jpg"  # 1920x1080
    small = load_training_image(photo, processor.image_processor)
    full = load_training_image(photo)
    assert small.size == (112, 112) and full.size == (1920, 1080)

    def pixels(image: Image.Image) -> torch.Tensor:
        out: torch.Tensor = processor(text=["<image>caption en"], images=[image], return_tensors="pt")["pixel_values"]
        return out

    assert torch.equal(pixels(small), pixels(full))
    pil_resized = full.resize((112, 112), Image.Resampling.BICUBIC)  # a near miss is caught
    assert not torch.equal(pixels(pil_resized), pixels(full))
    item = ExampleDataset(_examples(tmp_path, ["000000.jpg"]), processor)[0]
    assert item["image"].size == (112, 112)


def test_train_command_fails_cleanly_or_skips_a_truncated_photo(tiny_checkpoint: Path, images: Path) -> None:
    """A real process with a DataLoader worker: fail ends with one ``error:`` line naming the file, no traceback."""
    coco = _coco(images, ["000000.jpg", "truncated.jpg", "000001.jpg", "000000.jpg"], {})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for on_error in ("fail", "skip"):
        args = ["train", "--base", str(tiny_checkpoint), "--out", str(images / f"run-{on_error}"), "--coco"]
        args += [str(coco), "--workers", "1", "--max-steps", "2", "--batch-size", "2", "--on-error", on_error]
        run = subprocess.run(
            [sys.executable, "-m", "finetune", *args], capture_output=True, text=True, env=env, timeout=300
        )
        if on_error == "fail":
            assert run.returncode != 0, run.stderr[-2000:]
            assert "Traceback" not in run.stderr, run.stderr[-4000:]
            errors = re.findall(r"error: [^\r\n]*", run.stderr)  # after the progress bar, on its line
            assert errors == [f"error: {images / 'images' / 'truncated.jpg'}: {TRUNCATED}"], run.stderr[-2000:]
        else:
            assert run.returncode == 0, run.stderr[-4000:]
            assert json.loads((images / "run-skip" / "train_result.json").read_text())["steps"] == 2
