"""Images from the wild: every odd file is either classified or reported and skipped, and the run goes on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from src.config import ModelParams
from src.learn.inference import predict_files
from src.learn.model import Probabilities, build_model
from src.prepare.imaging import ImageReadError, load_image

SIZE = 32


def _landscape(width: int = 60, height: int = 30) -> Image.Image:
    """Left third red, the rest blue: shows where an EXIF rotation put the left edge."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 3] = (255, 0, 0)
    pixels[:, width // 3 :] = (0, 0, 255)
    return Image.fromarray(pixels)


def _readable(folder) -> list[str]:
    """Files a user may drop in that must be classified, written by Pillow."""
    Image.new("L", (50, 40), 128).save(folder / "grey.jpg")
    Image.new("CMYK", (50, 40), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # red in CMYK
    rgba = Image.new("RGBA", (50, 40), (0, 0, 0, 0))  # fully transparent black: shown as white
    rgba.save(folder / "transparent.png")
    rgba.convert("P").save(folder / "palette.png", transparency=0)
    Image.fromarray(np.full((40, 50), 128 * 257, np.uint16)).save(folder / "sixteen_bit.png")  # 16-bit mid grey
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    _landscape().save(folder / "rotated.jpg", exif=exif)
    return ["grey.jpg", "cmyk.jpg", "transparent.png", "palette.png", "sixteen_bit.png", "rotated.jpg"]


def _unreadable(folder, bomb_side: int) -> list[str]:
    """Files that must be reported and skipped; the bomb is over twice Pillow's pixel limit, a few KB on disk."""
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    _landscape(150, 100).save(folder / "whole.jpg", quality=95)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()
    Image.new("1", (bomb_side, bomb_side)).save(folder / "bomb.png")
    return ["empty.jpg", "notes.jpg", "truncated.jpg", "bomb.png"]


def test_odd_modes_become_the_rgb_they_show(tmp_path):
    _readable(tmp_path)
    assert (load_image(tmp_path / "grey.jpg", SIZE) == 128).all()
    red = load_image(tmp_path / "cmyk.jpg", SIZE).reshape(-1, 3).mean(axis=0)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    for name in ("transparent.png", "palette.png"):
        assert (load_image(tmp_path / name, SIZE) == 255).all(), name  # white, not the black under the alpha
    assert (load_image(tmp_path / "sixteen_bit.png", SIZE) == 128).all()  # scaled, not clipped to white
    rotated = load_image(tmp_path / "rotated.jpg", SIZE).astype(int)  # portrait now: red on top, centre-cropped
    assert rotated[0, :, 0].mean() > 200 and rotated[-1, :, 2].mean() > 200


def test_unreadable_files_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # Pillow's own limit, lowered: a small bomb will do
    reasons = {"empty.jpg": "cannot identify", "notes.jpg": "cannot identify", "truncated.jpg": "truncated"}
    for name in _unreadable(tmp_path, bomb_side=300):
        with pytest.raises(ImageReadError, match=f"{name}: not a readable image .*{reasons.get(name, 'bomb')}"):
            load_image(tmp_path / name, SIZE)


def test_predict_classifies_what_it_can_and_reports_the_rest(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000_000)  # a 24 MP camera photo is fine, 64 MP is not
    readable = _readable(tmp_path)
    Image.new("RGB", (6000, 4000), (200, 120, 90)).save(tmp_path / "camera.jpg", quality=90)
    bad = _unreadable(tmp_path, bomb_side=8000)
    model = Probabilities(build_model(ModelParams(name="test_vit", pretrained=False), SIZE)).eval()
    out = tmp_path / "out" / "submission.csv"
    assert predict_files([tmp_path], out, model, SIZE) == len(bad)
    frame = pd.read_csv(out)
    assert sorted(frame["image"]) == sorted(name.rsplit(".", 1)[0] for name in [*readable, "camera.jpg"])
    np.testing.assert_allclose(frame.iloc[:, 1:].sum(axis=1), 1, atol=1e-5)
    for name in bad:
        assert name in caplog.text
