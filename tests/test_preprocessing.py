"""Preprocessing against the reference's maths, the parity oracle's stored inputs and HF."""

import numpy as np
import pytest
import soundfile
import torch
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from csref_model.audio import WAV2VEC2_BASE_MIN_SAMPLES, load_audio, min_num_samples
from csref_model.preprocessing import letterbox, letterbox_geometry, prepare_waveform, speech_batch
from oracle_weights import oracle_dir

ORACLE = oracle_dir() / "srec_seeded.pt"


@pytest.fixture(scope="module")
def oracle_inputs():
    if not ORACLE.exists():
        pytest.skip(f"parity oracle not found at {ORACLE} (set CSREF_ORACLE_DIR)")
    return torch.load(ORACLE, map_location="cpu", weights_only=True)["inputs"]


def tone(seconds: float, sample_rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------
# Image


def test_letterbox_geometry_matches_oracle(oracle_inputs):
    for h, w, nh, nw, dx, dy in oracle_inputs["letterbox"].tolist():
        geometry = letterbox_geometry(h, w, 416)
        assert (geometry.h, geometry.w, geometry.nh, geometry.nw, geometry.dx, geometry.dy) == (h, w, nh, nw, dx, dy)


def test_letterbox_padding_and_pixel_values_match_oracle(oracle_inputs):
    for index, (h, w, *_rest) in enumerate(oracle_inputs["letterbox"].tolist()):
        reference = oracle_inputs["image"][index]  # (3, 416, 416)
        ours, geometry = letterbox(random_image(h, w, seed=index), 416)
        assert ours.shape == reference.shape and ours.dtype == torch.float32
        pad = torch.ones(416, 416, dtype=torch.bool)
        pad[geometry.dy : geometry.dy + geometry.nh, geometry.dx : geometry.dx + geometry.nw] = False
        # Padding is 127/255 in the oracle exactly where our geometry puts it.
        assert torch.equal(ours[:, pad], reference[:, pad])
        assert (reference[:, ~pad] != 127 / 255).any(dim=0).float().mean() > 0.9
        # Our uint8 -> float conversion gives the oracle's exact float values.
        as_uint8 = torch.round(reference * 255).to(torch.uint8)
        assert torch.equal(as_uint8.float().div(255), reference)


def test_letterbox_content_is_resized_image():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    image[:, :100] = (255, 0, 0)  # left half red, right half black
    tensor, geometry = letterbox(image, 64)
    assert (geometry.nw, geometry.nh, geometry.dx, geometry.dy) == (64, 32, 0, 16)
    assert torch.all(tensor[:, :16] == 127 / 255) and torch.all(tensor[:, 48:] == 127 / 255)
    assert torch.all(tensor[0, 16:48, :30] == 1.0) and torch.all(tensor[1:, 16:48, :30] == 0.0)
    assert torch.all(tensor[:, 16:48, 34:] == 0.0)


@pytest.mark.parametrize(
    "h, w, expected",
    [
        (480, 640, (312, 416, 0, 52)),
        (416, 416, (416, 416, 0, 0)),
        (500, 375, (416, 312, 52, 0)),
        (1, 3, (138, 416, 0, 139)),  # int() truncates 138.67
        (300, 200, (416, 277, 69, 0)),  # 416 * 2/3 = 277.33
    ],
)
def test_letterbox_geometry_truncates(h, w, expected):
    geometry = letterbox_geometry(h, w, 416)
    assert (geometry.nh, geometry.nw, geometry.dx, geometry.dy) == expected


def test_box_round_trip_and_full_image_box():
    geometry = letterbox_geometry(480, 640, 416)
    full_input = np.array([0.0, 52.0, 416.0, 364.0])
    np.testing.assert_allclose(geometry.box_to_original(full_input), [0, 0, 640, 480], atol=1e-9)
    boxes = np.array([[10.5, 20.25, 300.0, 400.0], [-5.0, 0.0, 700.0, 10.0]])
    np.testing.assert_allclose(geometry.box_to_original(geometry.box_to_input(boxes)), boxes, atol=1e-9)


def test_box_to_original_reference_formula():
    # Oracle sample 1's box on its 500x375 picture, computed by hand from docs/REFERENCE_FACTS.md §8.2.
    geometry = letterbox_geometry(500, 375, 416)
    x1, y1, x2, y2 = -47.52, 243.67, 84.22, 273.69
    expected = [(x1 - 52) / 312 * 375, (y1 - 0) / 416 * 500]
    expected += [expected[0] + (x2 - x1) / 312 * 375, expected[1] + (y2 - y1) / 416 * 500]
    np.testing.assert_allclose(geometry.box_to_original([x1, y1, x2, y2]), expected, rtol=0, atol=1e-12)


def test_box_to_label_normalises_and_clips():
    geometry = letterbox_geometry(480, 640, 416)
    label = geometry.box_to_label([160.0, 120.0, 480.0, 360.0])  # centred half-size box
    np.testing.assert_allclose(label, [0.5, 0.5, 0.5 * 416 / 416, 0.5 * 312 / 416], atol=1e-12)
    full = geometry.box_to_label([0.0, 0.0, 640.0, 480.0])
    np.testing.assert_allclose(full, [0.5, 0.5, 0.99, 0.75], atol=1e-12)
    outside = geometry.box_to_label([-100.0, -100.0, 50.0, 50.0])
    assert outside.min() >= 0.0 and outside.max() <= 0.99
    np.testing.assert_allclose(geometry.box_to_label([[160, 120, 480, 360]] * 3), np.tile(label, (3, 1)))


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((10, 10, 3), dtype=np.float32), "dtype uint8"),
        (np.zeros((10, 10), dtype=np.uint8), "greyscale"),
        (np.zeros((10, 10, 4), dtype=np.uint8), "RGBA"),
        (np.zeros((3, 10, 10), dtype=np.uint8), "channels-first"),
        (np.zeros((0, 10, 3), dtype=np.uint8), "empty"),
        (np.zeros((1, 2000, 3), dtype=np.uint8), "aspect ratio"),
        ([[0, 0, 0]], "numpy array"),
    ],
)
def test_bad_images_are_refused(image, message):
    with pytest.raises(ValueError, match=message):
        letterbox(image, 416)


def test_letterbox_accepts_non_contiguous_view():
    image = random_image(40, 60)
    tensor, _ = letterbox(image[:, ::-1], 32)
    expected, _ = letterbox(np.ascontiguousarray(image[:, ::-1]), 32)
    assert torch.equal(tensor, expected)


# ----------------------------------------------------------------------------------------
# Speech


def test_speech_batch_matches_oracle_input_values(oracle_inputs):
    waves = [oracle_inputs["waveform0"].numpy(), oracle_inputs["waveform1"].numpy()]
    input_values, attention_mask = speech_batch(waves)
    assert input_values.dtype == torch.float32 and attention_mask.dtype == torch.int32
    assert torch.equal(attention_mask, oracle_inputs["attention_mask"])
    assert (input_values - oracle_inputs["input_values"]).abs().max().item() <= 1e-6


def test_speech_batch_matches_hf_feature_extractor():
    rng = np.random.default_rng(1)
    waves = [rng.normal(0.1, 0.3, size=n).astype(np.float32) for n in (16000, 9000, 12345)]
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    reference = extractor(waves, sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="pt")
    input_values, attention_mask = speech_batch(waves)
    assert torch.equal(input_values, reference["input_values"])
    assert torch.equal(attention_mask, reference["attention_mask"].to(torch.int32))
    assert input_values[1, 9000:].abs().max() == 0


def test_min_num_samples_matches_wav2vec2_output_lengths():
    config = Wav2Vec2Config()
    assert WAV2VEC2_BASE_MIN_SAMPLES == 400
    assert min_num_samples(config.conv_kernel, config.conv_stride) == 400
    model = Wav2Vec2Model(
        Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                       num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, conv_dim=(8,) * 7)
    )
    lengths = model._get_feat_extract_output_lengths(torch.tensor([399, 400, 720]))
    assert lengths.tolist() == [0, 1, 2]
    assert min_num_samples([3, 2], [2, 2]) == 5  # 5 -> 2 -> 1 frame; 4 -> 1 -> 0


def test_prepare_waveform_16k_without_silence_is_unchanged():
    wave = tone(1.0, 16000)
    out = prepare_waveform(wave, 16000)
    assert out.dtype == np.float32 and np.array_equal(out, wave)


@pytest.mark.parametrize("sample_rate", [8000, 22050, 44100, 48000])
def test_prepare_waveform_resamples(sample_rate):
    out = prepare_waveform(tone(1.0, sample_rate, freq=440.0), sample_rate, trim=False)
    assert out.dtype == np.float32 and out.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * 16000 / out.shape[0] - 440.0) <= 1.0


def test_prepare_waveform_trims_silence():
    silence = np.zeros(8000, dtype=np.float32)
    wave = np.concatenate([silence, tone(1.0, 16000), silence])
    out = prepare_waveform(wave, 16000)
    # librosa.effects.trim works on 2048-sample frames hopped by 512: the edges keep at most
    # about one frame of silence.
    assert 16000 <= out.shape[0] <= 16000 + 2 * 2048
    assert prepare_waveform(wave, 16000, trim=False).shape == (32000,)


@pytest.mark.parametrize(
    "wave, message",
    [
        (np.zeros((16000, 2), dtype=np.float32), "mono 1-D"),
        (np.zeros(0, dtype=np.float32), "empty"),
        (np.zeros(16000, dtype=np.float32), "all zeros"),
        (np.where(np.arange(16000) == 5, np.nan, 0.1).astype(np.float32), "NaN/inf"),
        (np.where(np.arange(16000) == 7, np.inf, 0.1).astype(np.float32), "NaN/inf"),
        ((tone(1.0, 16000) * 32767).astype(np.int16), "32768"),
        (tone(1.0, 16000).tolist(), "numpy"),
    ],
)
def test_bad_audio_is_refused(wave, message):
    with pytest.raises(ValueError, match=message):
        prepare_waveform(wave, 16000)


def test_too_short_audio_is_refused_with_the_minimum():
    with pytest.raises(ValueError, match="at least 400 samples"):
        prepare_waveform(tone(399 / 16000, 16000), 16000, trim=False)
    assert prepare_waveform(tone(400 / 16000, 16000), 16000, trim=False).shape == (400,)
    # Long enough before trimming, too short after it.
    blip = np.concatenate([np.zeros(16000, np.float32), tone(0.005, 16000), np.zeros(16000, np.float32)])
    blip_trimmed = prepare_waveform(blip, 16000, min_samples=1)
    assert blip_trimmed.shape[0] < 16000
    with pytest.raises(ValueError, match="after trimming silence"):
        prepare_waveform(blip, 16000, min_samples=blip_trimmed.shape[0] + 1)


@pytest.mark.parametrize("sample_rate", [0, -16000, float("nan"), "16000", None])
def test_bad_sample_rate_is_refused(sample_rate):
    with pytest.raises(ValueError, match="sample_rate"):
        prepare_waveform(tone(1.0, 16000), sample_rate)


def test_load_audio_reads_wav_and_downmixes(tmp_path):
    wave = tone(0.5, 22050)
    soundfile.write(tmp_path / "mono.wav", wave, 22050, subtype="FLOAT")
    loaded, sample_rate = load_audio(tmp_path / "mono.wav")
    assert sample_rate == 22050 and loaded.dtype == np.float32 and np.array_equal(loaded, wave)
    stereo = np.stack([wave, np.zeros_like(wave)], axis=1)
    soundfile.write(tmp_path / "stereo.wav", stereo, 22050, subtype="FLOAT")
    loaded, _ = load_audio(tmp_path / "stereo.wav")
    assert loaded.shape == wave.shape and np.allclose(loaded, wave / 2)


def test_load_audio_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "garbage.wav").write_bytes(b"RIFF not really a wave file")
    with pytest.raises(ValueError, match="could not read audio file"):
        load_audio(tmp_path / "garbage.wav")
