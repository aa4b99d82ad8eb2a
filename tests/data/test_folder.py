"""data.folder: a folder of images (with caption sidecars) is recognised as a dataset."""

from PIL import Image

from clipft.data.folder import has_images


def test_has_images(tmp_path):
    assert not has_images(tmp_path)
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "a.png")
    assert has_images(tmp_path) and not has_images(tmp_path / "missing")
