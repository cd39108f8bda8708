"""Shared test configuration: a seeded, bounded hypothesis profile (as trio does)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

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
