"""Sizes as people type them: ``64M``, ``1.5G`` is not accepted, ``4096``, ``2T``."""

from __future__ import annotations

_SUFFIXES = "KMGT"


def parse_size(text: str) -> int:
    """Bytes in ``text``: a whole number with an optional K, M, G or T suffix (powers of 1024).

    >>> parse_size("64M"), parse_size("4096"), parse_size("1gib")
    (67108864, 4096, 1073741824)

    Raises:
        ValueError: with a message fit for a one-line error.
    """
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in _SUFFIXES:
        mult = 1024 ** (_SUFFIXES.index(t[-1]) + 1)
        t = t[:-1]
    if not t.isdigit():
        raise ValueError(f"cannot read size {text!r}: use a whole number with a K, M, G or T suffix")
    value = int(t) * mult
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value
