"""Fixtures shared by several test files."""

import pytest

from csref_model.config import load_model_config
from csref_model.srec import build_srec
from oracle_weights import load_oracle, oracle_dir, oracle_state_dict


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
