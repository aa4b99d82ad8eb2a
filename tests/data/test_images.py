"""data.images: decoding (one reason per bad file) and left/right caption swapping."""

from PIL import Image

from clipft.data.images import load_image, swap_left_right


def test_load_image_gives_rgb_or_a_reason(tmp_path):
    Image.new("L", (10, 6), 128).save(tmp_path / "grey.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    img, why = load_image(tmp_path / "grey.png")
    assert img.mode == "RGB" and img.size == (10, 6) and why is None
    assert load_image(tmp_path / "bad.jpg", warn=False) == (None, "undecodable: not a recognised image format")
    assert load_image(tmp_path / "nope.jpg", warn=False) == (None, "missing")


def test_swap_left_right():
    assert swap_left_right("a dog on the left of a cat") == "a dog on the right of a cat"
    assert swap_left_right("Left and RIGHTMOST") == "Right and LEFTMOST"
