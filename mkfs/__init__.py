"""Command-line tools: mkfs.sovfs (and fsck.sovfs, dump later). Thin: parsing, messages, exit codes."""
