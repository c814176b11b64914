import io

import numpy as np
import pytest
from PIL import Image

from dd3d.cli import UserError
from dd3d.data import load_reference_images, to_rgb, training_views
from tests.conftest import make_house


def test_modes_are_converted_correctly():
    gray = Image.new("L", (8, 8), 100)
    assert to_rgb(gray).getpixel((0, 0)) == (100, 100, 100)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white background
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0))[0] in (126, 127)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert to_rgb(palette).getpixel((0, 0)) == (10, 200, 30)
    palette.info["transparency"] = 1
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.fromarray(np.full((8, 8), 65535 // 2, dtype=np.uint16))  # 16-bit grey at half scale
    assert to_rgb(deep).getpixel((0, 0))[0] in (127, 128)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("1", (8, 8), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_png_and_exif_rotation(tmp_path):
    Image.fromarray(np.full((6, 10), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    rotated = Image.new("RGB", (20, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated.save(tmp_path / "photo.jpg", exif=exif.tobytes())
    images, paths = load_reference_images(tmp_path)
    by_name = dict(zip([p.name for p in paths], images))
    assert by_name["deep.png"].getpixel((0, 0)) == (255, 255, 255)
    assert by_name["photo.jpg"].size == (10, 20)  # displayed upright


def test_corrupt_files_skipped_with_a_warning(tmp_path, capsys):
    make_house().save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    buffer = io.BytesIO()
    make_house().save(buffer, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "notes.txt").write_text("not an image")
    images, paths = load_reference_images(tmp_path)
    assert [p.name for p in paths] == ["good.png"]
    err = capsys.readouterr().err
    assert "broken.png" in err and "truncated.jpg" in err


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_reference_images(tmp_path / "missing")
    with pytest.raises(UserError, match="holds no image files"):
        load_reference_images(tmp_path)
    (tmp_path / "a.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="none of the 1 image files"):
        load_reference_images(tmp_path)


def test_tiny_and_mixed_sizes_become_square_views(tmp_path, capsys):
    make_house(size=(6, 5)).save(tmp_path / "tiny.png")
    make_house(size=(64, 40), seed=1).save(tmp_path / "wide.png")
    make_house(size=(30, 90), seed=2).save(tmp_path / "tall.png")
    images, _ = load_reference_images(tmp_path, min_side=16)
    assert "tiny.png is only 6x5" in capsys.readouterr().err
    views, owners = training_views(images, 16, flip=True, crops=2, crop_scale=0.8, seed=0)
    assert views.shape == (3 * 3 * 2, 3, 16, 16)
    assert owners.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert views.min() >= -1 and views.max() <= 1
    assert np.allclose(views[0].flip(-1).numpy(), views[1].numpy())  # the mirrored twin
    again, _ = training_views(images, 16, flip=True, crops=2, crop_scale=0.8, seed=0)
    assert (again == views).all()


def test_default_views_keep_the_object_the_size_it_has_in_the_reference():
    """Zoom-in crops made the learned prompts draw frame-filling objects (BENCHMARKS.md); the default views are the
    reference and its mirror, so an object covering a quarter of the image covers a quarter of every view."""
    from dd3d.cli import load_config

    augment = load_config("train_distribution.yaml", None, []).augment
    image = Image.new("RGB", (32, 32), (240, 240, 240))
    image.paste((200, 20, 20), (10, 12, 26, 28))  # a 16 x 16 red square, off centre
    views, _ = training_views([image], 32, augment.flip, augment.crops, augment.crop_scale, seed=0)
    covered = ((views[:, 1] < 0.0).float().mean(dim=(1, 2))).tolist()  # green channel low: the red square
    assert covered == pytest.approx([0.25] * len(views), abs=0.02)
