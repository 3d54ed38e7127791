"""Contact sheet: every image lands in its own labelled tile, scaled to fit and centred."""
from __future__ import annotations

import pytest
from PIL import Image

from facebooth.runner.contact_sheet import BACKGROUND, TILE_BACKGROUND, make_contact_sheet, save_contact_sheet

COLORS = [(250, 20, 20), (20, 250, 20), (20, 20, 250), (240, 240, 30), (30, 240, 240)]


def _items(sizes):
    return [(f"img{k}", Image.new("RGB", size, COLORS[k])) for k, size in enumerate(sizes)]


def test_grid_size_and_each_tile_shows_its_image():
    tile, pad, label = 100, 8, 22
    items = _items([(64, 64), (200, 100), (30, 90), (64, 64), (10, 10)])
    sheet = make_contact_sheet(items, tile=tile, padding=pad, label_height=label)
    cols, rows = 3, 2  # near-square grid for 5 images
    assert sheet.size == (pad + cols * (tile + pad), pad + rows * (tile + label + pad))
    for k, (_, _img) in enumerate(items):
        r, c = divmod(k, cols)
        x0, y0 = pad + c * (tile + pad), pad + r * (tile + label + pad)
        assert sheet.getpixel((x0 + tile // 2, y0 + tile // 2)) == COLORS[k]
    # 200x100 is scaled to 100x50 and centred: black bars above and below
    x0 = pad + 1 * (tile + pad)
    assert sheet.getpixel((x0 + tile // 2, pad + 5)) == TILE_BACKGROUND
    assert sheet.getpixel((x0 + tile // 2, pad + 30)) == COLORS[1]


def test_labels_are_drawn_below_tiles():
    tile, pad, label = 64, 8, 22
    sheet = make_contact_sheet(_items([(32, 32)]), tile=tile, padding=pad, label_height=label)
    strip = sheet.crop((pad, pad + tile + 1, pad + tile, pad + tile + label))
    colors = {c for _, c in strip.getcolors(maxcolors=4096)}
    assert colors - {BACKGROUND}, "the label strip holds no text"
    blank = make_contact_sheet([("", Image.new("RGB", (32, 32), COLORS[0]))], tile=tile, padding=pad, label_height=label)
    blank_strip = blank.crop((pad, pad + tile + 1, pad + tile, pad + tile + label))
    assert {c for _, c in blank_strip.getcolors(maxcolors=4096)} == {BACKGROUND}


def test_title_adds_a_header_and_columns_can_be_fixed(tmp_path):
    items = _items([(16, 16)] * 4)
    plain = make_contact_sheet(items, tile=50, columns=4)
    titled = make_contact_sheet(items, tile=50, columns=4, title="run")
    assert plain.size[0] == titled.size[0] == 8 + 4 * 58
    assert titled.size[1] > plain.size[1]
    path = save_contact_sheet(items, tmp_path / "sub" / "sheet.png", tile=50)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == make_contact_sheet(items, tile=50).size


def test_grayscale_and_rgba_inputs_are_accepted():
    items = [("gray", Image.new("L", (20, 20), 128)), ("rgba", Image.new("RGBA", (20, 20), (10, 200, 10, 255)))]
    sheet = make_contact_sheet(items, tile=40, padding=8)
    assert sheet.getpixel((8 + 20, 8 + 20)) == (128, 128, 128)
    assert sheet.getpixel((8 + 48 + 20, 8 + 20)) == (10, 200, 10)


def test_empty_list_is_an_error():
    with pytest.raises(ValueError, match="at least one image"):
        make_contact_sheet([])
