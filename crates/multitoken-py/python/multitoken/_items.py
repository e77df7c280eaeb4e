"""Items from Python objects: PIL images become HxWxC uint8 arrays (no temporary
files); paths, bytes and numpy arrays go to the native module as they are."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from ._errors import InputError

# Pillow modes whose pixels convert to 8-bit RGB(A) the way a decoded file's would.
_WITH_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}
_TO_RGB = {"RGB", "P", "CMYK", "YCbCr", "LAB", "HSV", "1", "RGBX"}
# 16/32-bit integer and float pixels: no single right way to 8 bits, so refused.
_REFUSED = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _pil_to_array(image: Any) -> Any:
    import numpy as np

    mode = image.mode
    if mode in _REFUSED:
        raise InputError(
            f"a PIL image in mode {mode} (16/32-bit or float pixels) is not converted: "
            "scale it to 8 bits first, e.g. image.point(lambda v: v / 256).convert('L')"
        )
    if mode == "L":
        return np.asarray(image, dtype=np.uint8)
    if mode == "P" and "transparency" in image.info:
        return np.asarray(image.convert("RGBA"), dtype=np.uint8)
    if mode in _WITH_ALPHA:
        return np.asarray(image.convert("RGBA"), dtype=np.uint8)
    if mode in _TO_RGB:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    raise InputError(f"a PIL image in mode {mode} is not supported; convert it to RGB first")


def _is_pil_image(value: Any) -> bool:
    # Without importing PIL when the caller never uses it.
    module = type(value).__module__
    return module.startswith("PIL.") and hasattr(value, "mode") and hasattr(value, "convert")


def collect(
    images: Optional[Sequence[Any]] = None,
    audios: Optional[Sequence[Any]] = None,
    documents: Optional[Sequence[Any]] = None,
    items: Optional[Dict[str, Sequence[Any]]] = None,
) -> Dict[str, List[Any]]:
    """`{data_key: [item, ...]}` as the native module takes it."""
    out: Dict[str, List[Any]] = {}
    for key, given in (("images", images), ("speech_audios", audios), ("documents", documents)):
        if given is None:
            continue
        if isinstance(given, (str, bytes)) or not isinstance(given, (list, tuple)):
            raise InputError(f"{'audios' if key == 'speech_audios' else key} must be a list of items")
        out.setdefault(key, []).extend(_pil_to_array(v) if _is_pil_image(v) else v for v in given)
    for key, given in (items or {}).items():
        out.setdefault(key, []).extend(_pil_to_array(v) if _is_pil_image(v) else v for v in given)
    return out
