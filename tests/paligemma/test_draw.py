import numpy as np
from PIL import Image

from paligemma import parse_detections
from paligemma.draw import GROUND_TRUTH, PREDICTION, contact_sheet, draw_detections, side_by_side


def test_boxes_and_masks_are_drawn_in_their_colour() -> None:
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    (det,) = parse_detections("<loc0200><loc0100><loc0800><loc0600> red circle", 200, 100)
    det.score = 0.9
    mask = np.zeros((100, 200), dtype=bool)
    mask[40:60, 50:80] = True
    det.mask = mask
    out = np.asarray(draw_detections(image, [det], color=PREDICTION))
    x1, y1, x2, y2 = (round(v) for v in det.box)
    assert tuple(out[(y1 + y2) // 2, x1]) == PREDICTION  # left edge of the box
    assert out[50, 65].tolist() != [0, 0, 0]  # mask blended in
    assert out[95, 195].tolist() == [0, 0, 0]  # outside everything untouched
    assert np.asarray(image).max() == 0  # the input is not modified


def test_side_by_side_and_contact_sheet_sizes() -> None:
    a, b = Image.new("RGB", (100, 80), GROUND_TRUTH), Image.new("RGB", (120, 60))
    pair = side_by_side([a, b], titles=["base", "finetuned"], gap=8)
    assert pair.size == (100 + 120 + 3 * 8, 80 + 22 + 2 * 8)
    sheet = contact_sheet([pair] * 5, columns=2, gap=8)
    assert sheet.size == (2 * (pair.width + 8) + 8, 3 * (pair.height + 8) + 8)
