"""A drawn face: the input face workflows get when the user gives none."""
from __future__ import annotations

import io

def synthetic_face(seed: int = 0, size: int = 256):
    """A drawn frontal face (PIL RGB): skin-toned oval, eyes, brows, nose, mouth, on a cool background.

    It gives face workflows an input without shipping a photo. With random-weight face models nothing is
    recognised anyway; the warm skin tone is what the random insightface test detector fires on.
    """
    import random

    from PIL import Image, ImageDraw

    rnd = random.Random(seed)
    bg = (rnd.randint(40, 90), rnd.randint(70, 120), rnd.randint(130, 190))
    skin = (rnd.randint(200, 240), rnd.randint(130, 170), rnd.randint(100, 140))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    s = size / 256
    cx, cy = size / 2 + rnd.uniform(-8, 8) * s, size / 2 + rnd.uniform(-6, 6) * s
    hair = tuple(rnd.randint(20, 90) for _ in range(3))
    d.ellipse([cx - 78 * s, cy - 105 * s, cx + 78 * s, cy + 60 * s], fill=hair)
    d.ellipse([cx - 70 * s, cy - 90 * s, cx + 70 * s, cy + 95 * s], fill=skin)
    for side in (-1, 1):
        ex, ey = cx + side * 28 * s, cy - 15 * s
        d.ellipse([ex - 14 * s, ey - 7 * s, ex + 14 * s, ey + 7 * s], fill=(245, 245, 245))
        d.ellipse([ex - 6 * s, ey - 6 * s, ex + 6 * s, ey + 6 * s], fill=(60, 40, 30))
        d.line([ex - 16 * s, ey - 18 * s, ex + 16 * s, ey - 20 * s], fill=hair, width=max(1, int(5 * s)))
    d.polygon([(cx, cy - 5 * s), (cx - 10 * s, cy + 25 * s), (cx + 10 * s, cy + 25 * s)], fill=tuple(max(0, c - 30) for c in skin))
    d.arc([cx - 28 * s, cy + 30 * s, cx + 28 * s, cy + 60 * s], 20, 160, fill=(150, 50, 50), width=max(1, int(5 * s)))
    return img


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
