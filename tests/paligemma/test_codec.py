"""The <loc>/<seg> codec: encoding, every malformed output case, round-trip properties."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paligemma import LOC_MAX, encode_box, encode_detections, parse_detections, score_from_logprobs
from paligemma.tokens import SEG_TOKENS

SEGS = "".join(SEG_TOKENS[i] for i in range(16))


def test_encode_box_is_y_first_and_uses_1023() -> None:
    assert encode_box(0, 0, 100, 50, width=100, height=100) == "<loc0000><loc0000><loc0512><loc1023>"
    # x1=25 of 200 px -> round(0.125 * 1023) = 128; y1=10 of 40 px -> round(0.25 * 1023) = 256
    assert encode_box(25, 10, 200, 40, width=200, height=40) == "<loc0256><loc0128><loc1023><loc1023>"


def test_rounding_is_half_to_even_like_big_vision() -> None:
    # tf.round rounds half to even; so does Python's round: 255.5 -> 256 and 256.5 -> 256
    assert encode_box(0, 255.5, 10, 256.5, width=10, height=1023) == "<loc0256><loc0000><loc0256><loc1023>"


def test_encode_clips_outside_the_image() -> None:
    assert encode_box(-5, -5, 500, 500, width=100, height=100) == "<loc0000><loc0000><loc1023><loc1023>"


def test_encode_detections_joins_with_semicolons() -> None:
    target = encode_detections([((0, 0, 10, 10), "cat"), ((5, 5, 10, 10), "dog")], width=10, height=10)
    assert target == "<loc0000><loc0000><loc1023><loc1023> cat ; <loc0512><loc0512><loc1023><loc1023> dog"


def test_parse_one_detection_in_pixels() -> None:
    (det,) = parse_detections("<loc0256><loc0128><loc1023><loc1023> cat", width=200, height=40)
    assert det.label == "cat"
    assert det.loc_tokens == (256, 128, 1023, 1023)
    assert det.box == pytest.approx((128 / 1023 * 200, 256 / 1023 * 40, 200.0, 40.0))
    assert det.box_normalized == pytest.approx((128 / LOC_MAX, 256 / LOC_MAX, 1.0, 1.0))
    assert det.seg_tokens is None and det.mask is None and det.score is None


BOX_A = "<loc0100><loc0200><loc0300><loc0400>"
BOX_B = "<loc0500><loc0500><loc0900><loc0800>"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("no boxes here", []),
        (f"{BOX_A} cat", [("cat", (100, 200, 300, 400))]),
        (f"{BOX_A} cat ; {BOX_B} dog", [("cat", (100, 200, 300, 400)), ("dog", (500, 500, 900, 800))]),
        # partial group cut at max_tokens
        (f"{BOX_A} cat ; <loc0416><loc0", [("cat", (100, 200, 300, 400))]),
        (f"{BOX_A} cat ; <loc0416><loc0417>", [("cat", (100, 200, 300, 400))]),
        # five or more loc tokens in a row: the object is dropped
        (f"<loc0001>{BOX_A} cat ; {BOX_B} dog", [("dog", (500, 500, 900, 800))]),
        (f"{BOX_A}{BOX_B} cat", []),
        # y2 <= y1 or x2 <= x1
        ("<loc0300><loc0200><loc0100><loc0400> cat", []),
        ("<loc0100><loc0400><loc0300><loc0400> cat", []),
        # missing label, trailing/leading spaces, remnants
        (f"{BOX_A}", [(None, (100, 200, 300, 400))]),
        (f"{BOX_A} ; {BOX_B} dog", [(None, (100, 200, 300, 400)), ("dog", (500, 500, 900, 800))]),
        (f"   {BOX_A}   big  cat   ;  ", [("big cat", (100, 200, 300, 400))]),
        (f"{BOX_A} cat<eos>", [("cat", (100, 200, 300, 400))]),
        (f"{BOX_A} cat<eos><pad><pad>", [("cat", (100, 200, 300, 400))]),
        (f"<bos>{BOX_A} cat ;<end_of_turn>", [("cat", (100, 200, 300, 400))]),
        # repeated identical detections are kept once; same box, other label kept
        (f"{BOX_A} cat ; {BOX_A} cat ; {BOX_A} cat", [("cat", (100, 200, 300, 400))]),
        (f"{BOX_A} cat ; {BOX_A} dog", [("cat", (100, 200, 300, 400)), ("dog", (100, 200, 300, 400))]),
        # labels with spaces, dashes and underscores
        (
            f"{BOX_A} traffic-light_2 ; {BOX_B} red car",
            [("traffic-light_2", (100, 200, 300, 400)), ("red car", (500, 500, 900, 800))],
        ),
        # whitespace between loc tokens is tolerated
        ("<loc0100> <loc0200> <loc0300> <loc0400> cat", [("cat", (100, 200, 300, 400))]),
    ],
)
def test_malformed_and_normal_outputs(text: str, expected: list) -> None:  # type: ignore[type-arg]
    got = [(d.label, d.loc_tokens) for d in parse_detections(text, width=640, height=480)]
    assert got == expected


def test_segment_output_keeps_16_seg_indices() -> None:
    text = f"{BOX_A} {SEGS} wall ; {BOX_B}{SEGS[:-8]} car"
    wall, car = parse_detections(text, width=100, height=100)
    assert wall.label == "wall" and wall.seg_tokens == tuple(range(16))
    assert car.label == "car" and car.seg_tokens is None  # 15 seg tokens: box only


def test_parse_rejects_bad_image_size_without_raising() -> None:
    assert parse_detections(f"{BOX_A} cat", width=0, height=10) == []


def test_score_is_geometric_mean() -> None:
    assert score_from_logprobs([math.log(0.5), math.log(0.125)]) == pytest.approx(0.25)
    assert score_from_logprobs([]) is None
    assert score_from_logprobs([0.0, -math.inf]) == 0.0


sides = st.integers(min_value=1, max_value=10_000)


@st.composite
def boxes(draw: st.DrawFn) -> tuple[float, float, float, float, int, int]:
    width, height = draw(sides), draw(sides)
    unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
    # more than one bin apart, so the encoded box is valid: round() is half-to-even (as tf.round in
    # big_vision), so two values exactly one bin apart can share a bin (255.5 and 256.5 both give 256)
    gap = 1.001 / LOC_MAX
    x1, y1 = draw(unit) * (1 - gap), draw(unit) * (1 - gap)
    x2 = draw(st.floats(min_value=x1 + gap, max_value=1.0))
    y2 = draw(st.floats(min_value=y1 + gap, max_value=1.0))
    return x1 * width, y1 * height, x2 * width, y2 * height, width, height


@settings(max_examples=500, deadline=None)
@given(boxes(), st.text(alphabet=st.characters(blacklist_characters=";<>\n\r"), min_size=1, max_size=20))
def test_round_trip_within_half_a_bin(box: tuple[float, float, float, float, int, int], label: str) -> None:
    x1, y1, x2, y2, width, height = box
    text = encode_box(x1, y1, x2, y2, width, height) + " " + label
    (det,) = parse_detections(text, width, height)
    for got, want, side in zip(det.box, (x1, y1, x2, y2), (width, height, width, height), strict=True):
        assert abs(got - want) <= 0.5 / LOC_MAX * side + 1e-9 * side
    assert det.label == (" ".join(label.split()) or None)


loc_soup = st.lists(
    st.one_of(
        st.integers(0, 1023).map(lambda i: f"<loc{i:04d}>"),
        st.integers(0, 127).map(lambda i: f"<seg{i:03d}>"),
        st.sampled_from([" ", " ; ", ";", "<eos>", "<pad>", "<loc0", "cat", "<", ">", "\n"]),
        st.text(max_size=5),
    ),
    max_size=40,
).map("".join)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(), loc_soup), st.integers(-5, 10_000), st.integers(-5, 10_000))
def test_parse_never_raises(text: str, width: int, height: int) -> None:
    for det in parse_detections(text, width, height):
        x1, y1, x2, y2 = det.box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
