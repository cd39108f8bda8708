"""SovFS, the Sovereign Filesystem: a small, precisely specified inode filesystem (see docs/FORMAT.md)."""

from sovfs import _native

# The hot modules come compiled from build/native when that build matches the sources (see _native).
_native.activate(__path__)
