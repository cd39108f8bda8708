"""Regenerate the worked hexdump of docs/FORMAT.md §9.

Usage: PYTHONPATH=. python docs/hexdump_example.py
Formats a 256 KiB image with 1 KiB blocks, 32 inodes, a fixed UUID, hash seed and time, then prints the
non-zero 16-byte lines of each interesting block.
"""

from __future__ import annotations

from ledger.cli import hexdump
from sovfs.blockdev import ram_block_device
from sovfs.mkfs_core import MkfsParams, make_filesystem


def main() -> None:
    dev = ram_block_device(256 * 1024)  # the real driver/device pair over a RAM disk
    sb = make_filesystem(dev, MkfsParams(
        block_size=1024, inode_count=32, label=b"demo", uuid=bytes(range(0x10, 0x20)),
        hash_seed=bytes(range(0xA0, 0xB0)), journal_bytes=32 * 1024, now_ns=1_700_000_000_123_456_789,
    ))
    bs = sb.block_size
    regions = [
        ("primary superblock (block 1)", 1024, 1024),
        ("block bitmap (block 2)", sb.block_bitmap_start * bs, bs),
        ("inode bitmap (block 3)", sb.inode_bitmap_start * bs, bs),
        ("inode table, first block: inodes 1 and 2", sb.inode_table_start * bs, bs),
        (f"journal superblock (block {sb.journal_start})", sb.journal_start * bs, bs),
        (f"root directory node (block {sb.data_start})", sb.data_start * bs, bs),
        (f"lost+found directory node (block {sb.data_start + 1})", (sb.data_start + 1) * bs, bs),
    ]
    print(f"# {sb.block_count} blocks of {bs}, {sb.inode_count} inodes, journal {sb.journal_blocks} blocks "
          f"at {sb.journal_start}, data from {sb.data_start}, backup superblock at {sb.backup_sb_block}")
    for title, off, ln in regions:
        print(f"\n# {title}")
        print(hexdump(dev.pread(off, ln), off))
    dev.close()


if __name__ == "__main__":
    main()
