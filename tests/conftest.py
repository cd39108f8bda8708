"""Shared test configuration: a seeded, bounded hypothesis profile (as trio does)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from sovfs import _native

# Every cached inode Attr is checked against the inode it came from, in process and in the mount
# daemons the tests start (they inherit the environment): a change that skipped InodeStore.put fails.
os.environ["SOVFS_CHECK_ATTR_CACHE"] = "1"

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=60,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_report_header() -> str:
    return f"sovfs core: {_native.STATE}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With the compiled core, skip the tests marked ``pure_python``: they patch functions or methods
    that compiled code calls directly (bound when it was built), so the patch would not take.
    scripts/test.sh runs them in a second pass with ``SOVFS_PURE=1``."""
    if not _native.STATE.startswith("compiled"):
        return
    skip = pytest.mark.skip(reason="patches the core internals: runs in the pure-Python pass (SOVFS_PURE=1)")
    for item in items:
        if "pure_python" in item.keywords:
            item.add_marker(skip)
