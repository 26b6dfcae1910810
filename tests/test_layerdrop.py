"""wav2vec2 LayerDrop in training: a dropped layer passes its input on, as in the reference, so
SREC's layer fusion always receives every hidden state."""

import torch

from csref_model.config import load_model_config
from csref_model.srec import build_srec


def test_dropped_layers_repeat_their_input_state_and_keep_the_state_count() -> None:
    torch.manual_seed(0)
    model = build_srec(load_model_config("tiny"), load_pretrained=False).train()
    wav2vec2 = model.speech_encoder.model
    waveforms = torch.randn(2, 16000)
    for layer in wav2vec2.encoder.layers:
        layer.layerdrop = 1.0
    states = wav2vec2(waveforms, output_hidden_states=True).hidden_states
    assert len(states) == model.speech_encoder.num_states
    assert all(torch.equal(state, states[0]) for state in states)

    for layer in wav2vec2.encoder.layers:
        layer.layerdrop = 0.5
    for _ in range(8):  # about 4 layers dropped per pass: the fusion must still get every state
        assert model.speech_encoder(waveforms).shape == (2, model.speech_encoder.att_flat.linear_merge.out_features)

    model.eval()
    for layer in wav2vec2.encoder.layers:
        layer.layerdrop = 1.0
    states = wav2vec2(waveforms, output_hidden_states=True).hidden_states
    assert not torch.equal(states[-1], states[0])  # no LayerDrop at inference
