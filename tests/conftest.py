"""Fixtures shared by several test files."""

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from csref_model.checkpoint import save_checkpoint
from csref_model.config import load_model_config
from csref_model.srec import build_srec
from csref_ros.loopback import lock_domain_id, loopback_environment
from oracle_weights import load_oracle, oracle_dir, oracle_state_dict
from ros_support import DOMAIN_IDS, FASTDDS_PROFILE


@pytest.fixture
def ros_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for ROS child processes on a domain id no other test run holds."""
    candidates = list(DOMAIN_IDS)
    random.shuffle(candidates)
    domain_id, lock_file = lock_domain_id(candidates)
    env = loopback_environment(domain_id, FASTDDS_PROFILE, tmp_path / "ros_log")
    try:
        yield env
    finally:
        lock_file.close()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny CSRef checkpoint directory."""
    torch.manual_seed(0)
    config = load_model_config("tiny")
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny_random", build_srec(config, load_pretrained=False), config)


@pytest.fixture(scope="module")
def srec_oracle_weights():
    """(the SREC oracle dict, the seeded state dict it was computed with)."""
    if not (oracle_dir() / "srec_seeded.pt").is_file():
        pytest.skip(f"parity oracle not found in {oracle_dir()} (set CSREF_ORACLE_DIR)")
    oracle = load_oracle("srec")
    state_dict, fingerprint_ratio = oracle_state_dict(oracle)
    assert fingerprint_ratio <= 1.0
    return oracle, state_dict


@pytest.fixture(scope="module")
def base_oracle(srec_oracle_weights):
    """(base SREC with the seeded oracle weights in eval mode, its config, the oracle dict)."""
    oracle, state_dict = srec_oracle_weights
    config = load_model_config("base")
    model = build_srec(config, load_pretrained=False)
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), config, oracle
