"""Image loading with every failure turned into a named sample problem.

LLaVA-665K's image folders hold a few files that are not what their name says
(OCR-VQA has GIFs and PNGs saved as ``.jpg``); some readers accept them, some
crash mid-run. We decode each file fully, check its real format against its
extension, and report anything odd as a :class:`SampleProblem` naming the
path, instead of crashing or silently training on something else.
"""
from __future__ import annotations

import io
import os

from PIL import Image, UnidentifiedImageError

from icons_fast.data.errors import SampleProblem

# Extension -> the PIL formats a file with that name may really hold.
# MPO is the multi-picture JPEG some cameras write; PIL reads its first frame.
FORMATS_BY_SUFFIX = {
    ".jpg": {"JPEG", "MPO"},
    ".jpeg": {"JPEG", "MPO"},
    ".png": {"PNG"},
    ".gif": {"GIF"},
    ".bmp": {"BMP"},
    ".webp": {"WEBP"},
    ".tif": {"TIFF"},
    ".tiff": {"TIFF"},
}


class EmbeddedImage(str):
    """An image carried inside a record as encoded bytes (a dataset's image column) instead of a file.

    It is a ``str`` (its value is a name such as ``"pool.parquet[12]/image"`` or the
    file name the dataset kept), so every place that handles a record's image path
    (checks, ids, logs, json) handles it unchanged; :func:`load_image` decodes
    ``.data`` instead of opening a file.
    """

    data: bytes

    def __new__(cls, data: bytes, name: str):
        obj = super().__new__(cls, name)
        obj.data = bytes(data)
        return obj

    def __reduce__(self):  # DataLoader workers receive records by pickling
        return (EmbeddedImage, (self.data, str(self)))


def image_path(folder: str | None, rel_path: str) -> str:
    """``folder/rel_path`` (``rel_path`` alone when folder is None or rel_path is absolute)."""
    return rel_path if folder is None else os.path.join(folder, rel_path)


def load_image(folder: str | None, rel_path: str) -> Image.Image:
    """Open, fully decode and convert to RGB the image ``folder/rel_path`` (or an :class:`EmbeddedImage`'s bytes).

    Raises :class:`SampleProblem` with ``missing_image``, ``empty_image``
    (zero bytes or a zero width/height), ``image_format_mismatch`` (e.g. a GIF
    named ``.jpg``; unknown extensions accept any format) or
    ``corrupt_image`` (not decodable, truncated).
    """
    if isinstance(rel_path, EmbeddedImage):
        if not rel_path.data:
            raise SampleProblem("empty_image", f"{rel_path} has zero bytes")
        return _decode(io.BytesIO(rel_path.data), str(rel_path))
    path = image_path(folder, rel_path)
    if not os.path.isfile(path):
        if os.path.lexists(path):  # a directory, a device, a dangling or looping symlink
            raise SampleProblem("missing_image", f"{path} is not a regular file (a directory, a broken or looping "
                                                 f"symlink, or a device); point the record at an image file")
        raise SampleProblem("missing_image", f"{path} does not exist (check the image folder)")
    if os.path.getsize(path) == 0:
        raise SampleProblem("empty_image", f"{path} has zero bytes")
    return _decode(path, path)


def _decode(source, path: str) -> Image.Image:
    """Open ``source`` (a file path, or a bytes buffer named ``path``), check its format against ``path``'s suffix,
    decode."""
    try:
        with Image.open(source) as img:
            fmt = img.format
            allowed = FORMATS_BY_SUFFIX.get(os.path.splitext(path)[1].lower())
            if allowed is not None and fmt not in allowed:
                raise SampleProblem(
                    "image_format_mismatch",
                    f"{path} is really {fmt}, not {'/'.join(sorted(allowed))} (re-encode it or fix its name)",
                )
            if img.width == 0 or img.height == 0:
                raise SampleProblem("empty_image", f"{path} is {img.width}x{img.height}")
            img.load()  # decode now: a truncated file fails here, not in a worker later
            return img.convert("RGB")
    except SampleProblem:
        raise
    except (UnidentifiedImageError, OSError, EOFError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # PIL reports bad data as OSError ("image file is truncated"), SyntaxError
        # (bad PNG chunks), EOFError or ValueError depending on the decoder;
        # DecompressionBombError for absurd sizes.
        raise SampleProblem("corrupt_image", f"{path} cannot be decoded ({type(exc).__name__}: {exc})") from exc


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad ``img`` to a centred square with colour ``fill`` (LLaVA-1.5's ``image_aspect_ratio='pad'``)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out
