"""Across-speaker minimal-pair ABX (csref_training.abx): its word groups, its DTW distance, its error
on hand-made features, and real espeak-ng speech through log-mel, a ResDAVEnet-VQ and the demo model."""

import re
import subprocess

import numpy as np
import pytest

from csref_model.checkpoint import save_checkpoint
from csref_model.davenet import Davenet, load_davenet_config
from csref_training import abx

VOICES = "en-us+m8,en-gb+anika,en-gb-scotland+klatt2"  # from espeak-ng's held-out list


def phonemes(word: str) -> str:
    return subprocess.run(["espeak-ng", "-q", "-x", word], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("group, frame", [("vowel", r"b'(.+)t"), ("onset", r"(.+)'at"), ("coda", r"b'a(.+)")])
def test_each_group_differs_in_one_phone_at_one_position(group, frame):
    changed = [re.fullmatch(frame, phonemes(word)) for word in abx.MINIMAL_PAIRS[group]]
    assert all(changed), [phonemes(word) for word in abx.MINIMAL_PAIRS[group]]
    middles = [match.group(1) for match in changed]
    assert len(set(middles)) == len(middles) and all(len(m) <= 2 for m in middles), middles  # one symbol: a, eI, u:


def test_dtw_distance_warps_time_and_measures_angles():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 4))
    assert abx.dtw_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert abx.dtw_distance(a, np.repeat(a, 2, axis=0)) == pytest.approx(0.0, abs=1e-6)  # twice as slow
    assert abx.dtw_distance(a, 3.0 * a) == pytest.approx(0.0, abs=1e-6)  # angles, not magnitudes
    assert abx.dtw_distance(np.eye(4)[:1].repeat(5, 0), np.eye(4)[1:2].repeat(3, 0)) == pytest.approx(0.5)
    b = rng.normal(size=(5, 4))
    assert abx.dtw_distance(a, b) == pytest.approx(abx.dtw_distance(b, a))


def test_abx_error_is_zero_for_features_of_the_word_and_one_half_for_features_of_nothing():
    voices = ("v1", "v2", "v3")
    words = sorted({word for group in abx.MINIMAL_PAIRS.values() for word in group})
    rng = np.random.default_rng(1)
    per_word = {word: rng.normal(size=(4, 8)) for word in words}
    # The word's own frames, each voice louder or softer and slower or faster: the word decides.
    by_word = {(word, voice): per_word[word].repeat(1 + index, axis=0) * (1 + index)
               for word in words for index, voice in enumerate(voices)}
    assert abx.abx_errors(by_word, voices)["abx_error"] == 0.0
    # The voice's frames only: every triplet ties.
    by_voice = {(word, voice): np.full((3, 8), 1.0 + index) + np.eye(8)[index][None]
                for word in words for index, voice in enumerate(voices)}
    errors = abx.abx_errors(by_voice, voices)
    assert errors["abx_error"] == 0.5 and set(errors) == {"vowel", "onset", "coda", "abx_error"}


def test_espeak_speech_through_log_mel_a_davenet_and_the_demo_model(tmp_path, capsys):
    log_mel = abx.main(["--voices", VOICES])["log_mel"]
    assert log_mel["abx_error"] < 0.25  # 0.09 measured with six held-out voices
    assert '"log_mel"' in capsys.readouterr().out

    config = load_davenet_config("davenet_tiny")
    config.speech.vq_layers = [2]
    save_checkpoint(tmp_path / "davenet", Davenet(config), config)
    untrained = abx.main(["--checkpoint", str(tmp_path / "davenet"), "--layers", "1,2", "--voices", VOICES])
    assert set(untrained) == {"davenet_conv1", "davenet_conv2", "davenet_quant2"}
    assert all(0.0 <= result["abx_error"] <= 1.0 for result in untrained.values())

    demo = abx.main(["--checkpoint", "models/spoken_shapes_tiny", "--layers", "2", "--voices", VOICES])
    assert demo["wav2vec2_state2"]["abx_error"] < 0.35  # 0.17 measured with six held-out voices


def test_bad_arguments_say_what_to_do(tmp_path, capsys):
    for argv, message in ((["--voices", "en-us"], "at least two voices"),
                          (["--checkpoint", str(tmp_path)], "not a checkpoint directory"),
                          (["--layers", "two"], "comma-separated integers")):
        with pytest.raises(SystemExit):
            abx.main(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="hidden state 9 does not exist"):
        abx.main(["--checkpoint", "models/spoken_shapes_tiny", "--layers", "9", "--voices", VOICES])


def test_davenet_quant_frames_are_the_nearest_codebook_entries_of_its_conv_frames():
    config = load_davenet_config("davenet_tiny")
    config.speech.vq_layers = [2, 3]
    model = Davenet(config).eval()
    wave = np.random.default_rng(2).normal(scale=0.1, size=8000).astype(np.float32)
    for slot in (2, 3):
        conv = abx.davenet_frames(model, slot, quantised=False)(wave)  # (T, W)
        quant = abx.davenet_frames(model, slot, quantised=True)(wave)
        codebook = model.speech_encoder.quantizers[str(slot)].codebook.numpy()  # (K, W)
        nearest = codebook[((conv[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(1)]
        assert conv.shape == quant.shape and conv.shape[1] == config.speech.widths[slot - 1]
        np.testing.assert_allclose(quant, nearest, atol=1e-5)
    # Slot 1 has no VQ layer here.
    with pytest.raises(ValueError, match="slot 1 has no VQ layer"):
        abx.davenet_frames(model, 1, quantised=True)
