"""SovFS, the Sovereign Filesystem: a small, precisely specified inode filesystem (see docs/FORMAT.md)."""
