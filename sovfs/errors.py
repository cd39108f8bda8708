"""SovFS error hierarchy.

Theory of operation
-------------------
Every failure the filesystem core reports is a :class:`SovError` subclass that carries the POSIX ``errno``
a caller (the FUSE adapter, mkfs, fsck) should report.  Errors are raised at the lowest layer that detects
them and travel upward unchanged; only ``sovfs/fuse_ops.py`` (later) turns them into ``FUSEError``.

Corrupt on-disk data is never an ``assert``: it raises :class:`Corrupt` (``EIO``) with a message naming the
block or inode, so that the FS can switch to failsafe (read-only) mode and fsck can report it.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "BadName",
    "Corrupt",
    "Exists",
    "FileTooBig",
    "InvalidArgument",
    "IsDir",
    "NameTooLong",
    "NeedsCheck",
    "NoData",
    "NoSpace",
    "NotDir",
    "NotEmpty",
    "NotFound",
    "NotSupported",
    "PermissionDenied",
    "RangeError",
    "ReadOnly",
    "SovError",
    "TooManyLinks",
    "CrossDevice",
]


class SovError(Exception):
    """Base class: a filesystem error carrying a POSIX errno."""

    errno: int = _errno.EIO

    def __init__(self, message: str = "", *, errno: int | None = None) -> None:
        super().__init__(message or _errno.errorcode.get(self.errno, "error"))
        if errno is not None:
            self.errno = errno


class NotFound(SovError):
    errno = _errno.ENOENT


class Exists(SovError):
    errno = _errno.EEXIST


class NotDir(SovError):
    errno = _errno.ENOTDIR


class IsDir(SovError):
    errno = _errno.EISDIR


class NotEmpty(SovError):
    errno = _errno.ENOTEMPTY


class NameTooLong(SovError):
    errno = _errno.ENAMETOOLONG


class NoSpace(SovError):
    errno = _errno.ENOSPC


class FileTooBig(SovError):
    errno = _errno.EFBIG


class NoData(SovError):
    """Extended attribute not present (ENODATA)."""

    errno = _errno.ENODATA


class RangeError(SovError):
    """Extended attribute value or list does not fit the caller's buffer or the format (ERANGE)."""

    errno = _errno.ERANGE


class InvalidArgument(SovError):
    errno = _errno.EINVAL


class BadName(InvalidArgument):
    """A name that is empty, '.', '..', or contains '/' or NUL."""


class NotSupported(SovError):
    errno = _errno.EOPNOTSUPP


class PermissionDenied(SovError):
    errno = _errno.EPERM


class ReadOnly(SovError):
    errno = _errno.EROFS


class TooManyLinks(SovError):
    errno = _errno.EMLINK


class CrossDevice(SovError):
    errno = _errno.EXDEV


class NeedsCheck(SovError):
    """The image is not marked clean or has recorded errors: run fsck before mounting (EUCLEAN)."""

    errno = _errno.EUCLEAN


class Corrupt(SovError):
    """On-disk data failed a checksum or a structural check (EIO)."""

    errno = _errno.EIO
