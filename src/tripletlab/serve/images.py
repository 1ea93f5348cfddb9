"""Decode uploaded images safely: known formats only, bounded pixel count, complete files."""

from __future__ import annotations

import io

from PIL import Image, ImageFile, UnidentifiedImageError

__all__ = ["ALLOWED_FORMATS", "ImageRejected", "decode_image", "thumbnail_png"]

#: Pillow formats accepted from clients (no EPS/PDF/ICO oddities, nothing with a plugin zoo).
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "PPM", "TIFF", "WEBP")


class ImageRejected(Exception):
    """An upload that is not a usable image; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_image") -> None:
        super().__init__(message)
        self.status, self.code = status, code


def decode_image(data: bytes, max_pixels: int, name: str = "image") -> Image.Image:
    """Decode ``data`` into a loaded PIL image (first frame), or raise :class:`ImageRejected`.

    The header is read first: an image of more than ``max_pixels`` pixels (a decompression
    bomb: a few KB of PNG can declare 20,000 x 20,000 pixels) is rejected with 413 before any
    pixel is decoded. Truncated or corrupt files are rejected with 400.

    Example:
        >>> buf = io.BytesIO(); Image.new("L", (4, 4)).save(buf, "PNG")
        >>> decode_image(buf.getvalue(), max_pixels=100).size
        (4, 4)
    """
    if not data:
        raise ImageRejected(f"{name} is empty", 400, "empty_upload")
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageRejected(f"{name}: {e}", 413, "image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise ImageRejected(
            f"{name} is not an image in a supported format ({', '.join(ALLOWED_FORMATS)})",
            400,
            "not_an_image",
        ) from None
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageRejected(f"{name} has no pixels ({w}x{h})", 400, "bad_image")
    if w * h > max_pixels:
        im.close()
        raise ImageRejected(
            f"{name} is {w}x{h} = {w * h:,} pixels, above this server's limit of "
            f"{max_pixels:,} pixels; send a smaller image",
            413,
            "image_too_large",
        )
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        im.seek(0)
        im.load()
    except Image.DecompressionBombError as e:
        raise ImageRejected(f"{name}: {e}", 413, "image_too_large") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise ImageRejected(
            f"{name} is truncated or corrupt ({type(e).__name__}: {e})", 400, "corrupt_image"
        ) from None
    return im


def thumbnail_png(im: Image.Image, size: int = 160) -> bytes:
    """A PNG thumbnail (longest side ``size``) that any browser shows (PGM/TIFF are not)."""
    t = im.convert("RGB" if im.mode not in ("L", "RGB") else im.mode)
    t.thumbnail((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    t.save(buf, "PNG", optimize=False)
    return buf.getvalue()
