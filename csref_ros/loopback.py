"""Environments for the ROS 2 processes we start ourselves (tests, demo, benchmarks).

Each run takes a ROS domain id no other run holds (a lock file per id, kept open for as long as
the processes live) and keeps all traffic on loopback: automatic discovery limited to
LOCALHOST and the Fast DDS profile config/fastdds_loopback.xml (shared memory for large images).
"""

import fcntl
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TextIO

# Shared by every checkout on this machine, so that two runs never meet on one domain.
DOMAIN_LOCK_DIR = Path(tempfile.gettempdir()) / "csref_ros_test_domains"


def lock_domain_id(domain_ids: Iterable[int]) -> tuple[int, TextIO]:
    """The first id of `domain_ids` no other run holds, and its lock file (close it to release)."""
    DOMAIN_LOCK_DIR.mkdir(exist_ok=True)
    tried = []
    for domain_id in domain_ids:
        tried.append(domain_id)
        lock_file = open(DOMAIN_LOCK_DIR / f"{domain_id}.lock", "w")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            continue
        return domain_id, lock_file
    raise RuntimeError(f"all ROS domain ids {min(tried, default='-')}..{max(tried, default='-')} are held by "
                       f"other runs (locks in {DOMAIN_LOCK_DIR}); wait for them or remove stale lock files")


def loopback_environment(domain_id: int, fastdds_profile: Path, log_dir: Path | None = None,
                         base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`base` plus the variables that keep a ROS 2 process on loopback in domain `domain_id`."""
    env = dict(
        base,
        ROS_DOMAIN_ID=str(domain_id),
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
        RMW_IMPLEMENTATION="rmw_fastrtps_cpp",
        FASTDDS_DEFAULT_PROFILES_FILE=str(fastdds_profile),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    if log_dir is not None:
        env["ROS_LOG_DIR"] = str(log_dir)
    return env
