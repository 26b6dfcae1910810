"""The tiny SREC end to end, and clear errors for inputs the model cannot take."""

from pathlib import Path

import pytest
import torch

from csref_model.config import load_model_config
from csref_model.fusion import GaranAttention
from csref_model.srec import build_srec, build_srec_from_checkpoint

DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "spoken_shapes_tiny"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_srec(load_model_config("tiny"), load_pretrained=False).eval()


def inputs(batch: int = 2, side: int = 256, samples: int = 16000):
    return torch.rand(batch, 3, side, side), torch.randn(batch, samples), torch.ones(batch, samples, dtype=torch.int32)


def test_tiny_forward_loss_and_broadcast(tiny):
    image, audio, mask = inputs()
    with torch.no_grad():
        boxes = tiny(image, audio, mask)
        # one frame, two utterances: the image batch of 1 broadcasts
        one_frame = tiny.ground_features(tiny.encode_image(image[:1]), tiny.encode_speech(audio, mask))
    assert boxes.shape == (2, 5) and torch.isfinite(boxes).all()
    assert ((boxes[:, 4] > 0) & (boxes[:, 4] < 1)).all()
    torch.testing.assert_close(one_frame[0], boxes[0], rtol=1e-4, atol=1e-3)
    tiny.train()
    try:
        loss = tiny(image, audio, mask, targets=torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.2, 0.7, 0.1, 0.1]]))
        loss.backward()
    finally:
        tiny.eval()
        tiny.zero_grad()
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("image, message", [
    (torch.rand(1, 3, 256, 224), "square"),
    (torch.rand(1, 3, 250, 250), "multiple of 32"),
    (torch.rand(1, 4, 256, 256), r"\(B, 3, S, S\)"),
    (torch.zeros(1, 3, 256, 256, dtype=torch.uint8), "float"),
    (torch.rand(3, 256, 256), r"\(B, 3, S, S\)"),
])
def test_bad_images(tiny, image, message):
    with pytest.raises(ValueError, match=message):
        tiny.encode_image(image)


def test_too_short_audio(tiny):
    with pytest.raises(ValueError, match="at least 400"):
        tiny.encode_speech(torch.randn(1, 399))
    audio = torch.randn(2, 8000)
    mask = torch.ones(2, 8000, dtype=torch.int32)
    mask[1, 300:] = 0  # second utterance: 300 valid samples
    with pytest.raises(ValueError, match=r"\[8000, 300\]"):
        tiny.encode_speech(audio, mask)


def test_bad_speech_tensors(tiny):
    with pytest.raises(ValueError, match="does not match"):
        tiny.encode_speech(torch.randn(1, 8000), torch.ones(1, 7999))
    with pytest.raises(ValueError, match=r"float \(B, L\)"):
        tiny.encode_speech(torch.randn(8000))


def test_batch_mismatch_and_bad_targets(tiny):
    image, audio, mask = inputs(batch=3)
    with torch.no_grad():
        maps = tiny.encode_image(image)
        speech = tiny.encode_speech(audio[:2], mask[:2])
        with pytest.raises(ValueError, match="image batch 3 and speech batch 2"):
            tiny.ground_features(maps, speech)
        with pytest.raises(ValueError, match="targets must be"):
            tiny.ground_features([m[:1] for m in maps], speech[:1], targets=torch.rand(1, 1, 4))
        with pytest.raises(ValueError, match=r"needs the image maps of encode_image .*got 2"):
            tiny.ground_features(maps[:2], speech)


def test_garan_refuses_non_square_maps():
    garan = GaranAttention(speech_dim=8, channels=8).eval()
    with pytest.raises(ValueError, match="square"):
        garan(torch.randn(1, 8), torch.randn(1, 8, 4, 6))


def test_speech_encoder_under_cpu_bf16_autocast_matches_fp32():
    """The demo model's speech encoder (positional conv: 16 groups, kernel 32, the shape torch's
    CPU bf16 convolution gets wrong) under bf16 autocast stays close to its float32 output."""
    model, _ = build_srec_from_checkpoint(DEMO_MODEL)
    model.eval()
    torch.manual_seed(0)
    waveform = torch.randn(2, 24000)
    with torch.no_grad():
        fp32 = model.encode_speech(waveform, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.encode_speech(waveform, None).float()
    assert ((bf16 - fp32).norm() / fp32.norm()).item() < 0.05
