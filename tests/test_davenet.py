"""ResDAVEnet-VQ: VQ EMA and commitment, the triplet loss, log-mel features, scene captions with word
alignments, and a tiny training run through the shared loop with evaluation, warm start, units and
retrieval CLIs, all on a generated caption set."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from csref_model.audio import SAMPLE_RATE
from csref_model.cli.ground import read_image_rgb
from csref_model.davenet import (
    Davenet,
    DavenetConfig,
    LogMelConfig,
    SpeechEncoderConfig,
    SpeechImageRetriever,
    VectorQuantizerEMA,
    best_view,
    image_batch,
    load_davenet_config,
    log_mel,
    pad_features,
    triplet_loss,
)
from csref_training import davenet
from csref_training.spoken_shapes import generate
from csref_training.spoken_shapes.generate import SynthConfig
from csref_training.spoken_shapes.grammar import SceneObject, caption_words, parse_expression, referents, scene_caption
from csref_training.spoken_shapes.speech import render_word_sequence

CONFIG = Path(__file__).resolve().parent.parent / "config" / "train" / "davenet_spoken_shapes.yaml"
COUNTS = {"train": 8, "val": 4, "test": 4}
REFERENTS = 2  # scenes with several entries: retrieval must still see each image once


def test_vq_ema_update_and_commitment_on_a_hand_made_case():
    vq = VectorQuantizerEMA(codebook_size=2, dim=2, decay=0.5, commitment_cost=0.25)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    vq.ema_sum.copy_(vq.codebook)
    vq.ema_count.fill_(1.0)
    # Frames (B=1, D=2, T=4): (1, 1) and (2, 0) go to entry 0, (9, 9) to entry 1; the 4th is padding.
    frames = torch.tensor([[[1.0, 9.0, 2.0, 100.0], [1.0, 9.0, 0.0, 100.0]]], requires_grad=True)
    valid = torch.tensor([[True, True, True, False]])

    vq.eval()
    quantised, codes, commitment = vq(frames, valid)
    assert codes.tolist() == [[0, 1, 0, 1]]
    assert torch.equal(quantised[0, :, :3], torch.tensor([[0.0, 10.0, 0.0], [0.0, 10.0, 0.0]]))
    # 0.25 x mean of the squared errors over the 3 valid frames x 2 dims: (1 + 1 + 1 + 1 + 4 + 0) / 6.
    assert commitment.item() == pytest.approx(0.25 * 8 / 6)
    assert torch.equal(vq.codebook, torch.tensor([[0.0, 0.0], [10.0, 10.0]]))  # eval: no update

    vq.train()
    quantised, codes, commitment = vq(frames, valid)
    # counts 0.5 * 1 + 0.5 * (2, 1) = (1.5, 1); sums 0.5 * old + 0.5 * ((3, 1), (9, 9)); entry = sum / count.
    assert vq.ema_count.tolist() == pytest.approx([1.5, 1.0])
    assert vq.codebook.flatten().tolist() == pytest.approx([1.0, 1.0 / 3.0, 9.5, 9.5])
    # Straight-through: the quantised output passes the gradient to the frames unchanged.
    quantised.sum().backward()
    assert torch.equal(frames.grad, torch.ones_like(frames))


def test_codebook_initialisation_options():
    torch.manual_seed(0)
    default = VectorQuantizerEMA(codebook_size=512, dim=16, decay=0.99, commitment_cost=1.0)
    assert (default.codebook < 0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert default.codebook.std().item() == pytest.approx(1.0, abs=0.03)
    nonneg = VectorQuantizerEMA(codebook_size=512, dim=16, decay=0.99, commitment_cost=1.0, init_std=0.5,
                                nonneg_init=True)
    assert nonneg.codebook.min().item() == 0.0 and (nonneg.codebook == 0).float().mean().item() > 0.4
    assert nonneg.codebook.max().item() == pytest.approx(0.5 * default.codebook.max().item(), rel=0.3)
    assert torch.equal(nonneg.ema_sum, nonneg.codebook)  # the EMA starts from the clamped entries
    with pytest.raises(ValueError, match="codebook_init_std must be > 0"):
        DavenetConfig.from_dict({"speech": {"codebook_init_std": 0.0}})


def test_triplet_loss_on_hand_made_similarities():
    # Two pairs: the random impostor is the other item, so every term is fixed.
    scores = torch.tensor([[3.0, 1.0], [2.5, 2.0]])
    # Rows: random (0 + 1.5) / 2, semi-hard (0 + 0) / 2 (row 1 has nothing below its positive: 0
    # stands in for its impostor, and 1 + 0 - 2 < 0).
    # Columns: random (0.5 + 0) / 2, semi-hard (0.5 + 0) / 2.
    assert triplet_loss(scores, margin=1.0).item() == pytest.approx(1.25)
    # Three pairs with equal off-diagonal scores: positives 2, 0.5, 1.2 against impostors at 1. The
    # positive 0.5 has no impostor below it and still pays margin - 0.5 in the semi-hard term, as
    # in the official code (its zeroed scores are the impostor then).
    scores = torch.full((3, 3), 1.0) + torch.diag(torch.tensor([1.0, -0.5, 0.2]))
    per_direction = (0 + 1.5 + 0.8) / 3 + (0 + 0.5 + 0.8) / 3
    assert triplet_loss(scores, margin=1.0).item() == pytest.approx(2 * per_direction)
    # Impostors below the positive but under 0 count as 0: here only the positive's own size matters.
    scores = torch.full((3, 3), -4.0) + torch.diag(torch.tensor([4.5, 3.0, 5.0]))  # positives 0.5, -1, 1
    per_direction = 0 + (0.5 + 2.0 + 0) / 3
    assert triplet_loss(scores, margin=1.0).item() == pytest.approx(2 * per_direction)
    # Well separated pairs cost nothing.
    assert triplet_loss(torch.eye(4) * 5, margin=1.0).item() == 0.0
    with pytest.raises(ValueError, match="square"):
        triplet_loss(torch.zeros(1, 1), margin=1.0)
    # Impostors masked: each anchor keeps exactly one impostor (image i <-> utterance i + 1 mod 3),
    # so every term is fixed; the masked pairs score 9 and would cost 8 each.
    scores = torch.tensor([[2.0, 1.5, 9.0], [9.0, 2.0, 0.5], [1.0, 9.0, 2.0]])
    impostors = torch.tensor([[True, True, False], [False, True, True], [True, False, True]])
    # Rows: only image 0 vs utterance 1 costs 0.5 (random and semi-hard); columns: only
    # utterance 1 vs image 0, 0.5 twice. Four means of 0.5 / 3.
    for _ in range(5):
        assert triplet_loss(scores, margin=1.0, impostors=impostors).item() == pytest.approx(4 * 0.5 / 3)
    assert triplet_loss(scores, margin=1.0, impostors=torch.zeros(3, 3, dtype=torch.bool)).item() == 0.0


def test_log_mel_shape_frame_rate_and_range():
    cfg = LogMelConfig()
    time = np.arange(16000) / 16000
    tone = torch.from_numpy((0.5 * np.sin(2 * np.pi * 1000 * time)).astype(np.float32))
    features = log_mel(tone, cfg)
    assert features.shape == (40, 101)  # 1 + 16000 / 160 frames of 10 ms
    assert features.max().item() == 0.0 and features.min().item() >= -80.0
    # The loudest band is the one around 1 kHz, the same in every frame but the edges.
    loudest = features[:, 5:-5].argmax(dim=0)
    assert len(set(loudest.tolist())) == 1
    # Slaney mel: 42 edges evenly spaced from mel(20 Hz) = 0.3 to mel(8 kHz) = 45.25, 1 kHz = mel 15,
    # so band 12 (centre mel 14.55, 970 Hz) is the nearest.
    assert loudest[0].item() == 12
    assert log_mel(tone[:8000], cfg).shape == (40, 51)
    batch, lengths = pad_features([features, log_mel(tone[:8000], cfg)], cfg.floor_db)
    assert batch.shape == (2, 40, 101) and lengths.tolist() == [101, 51]
    assert torch.all(batch[1, :, 51:] == -80.0)


def test_an_utterance_encodes_the_same_alone_and_in_a_padded_batch():
    """Frames past an utterance's end never reach its embedding or its codes (eval mode)."""
    torch.manual_seed(0)
    speech = SpeechEncoderConfig(widths=[8, 16, 16, 32, 32], depths=[1, 2, 1, 1], vq_layers=[2, 3], codebook_size=16)
    model = Davenet(DavenetConfig(speech=speech)).eval()
    features = [torch.randn(40, frames) * 10 - 40 for frames in (301, 170, 97)]
    batch, lengths = pad_features(features, floor_db=80.0)
    with torch.no_grad():
        together = model.encode_speech(batch, lengths)
        for index, feature in enumerate(features):
            alone = model.encode_speech(feature[None], torch.tensor([feature.shape[1]]))
            frames = int(alone.lengths[0])
            assert int(together.lengths[index]) == frames and alone.embeddings.shape[-1] == frames
            torch.testing.assert_close(together.embeddings[index, :, :frames], alone.embeddings[0], rtol=1e-5, atol=1e-5)
            assert not together.embeddings[index, :, frames:].any()
            for slot in (2, 3):
                codes = int(alone.code_lengths[slot][0])
                assert torch.equal(together.codes[slot][index, :codes], alone.codes[slot][0])


def test_finer_cspdarknet_maps_are_embedded_and_summed_on_the_finest_grid():
    """cspdarknet_strides [8, 16, 32]: one map on the stride-8 grid whose cell mean (the pooled
    dot product's image vector) is the sum of the three embedded maps' means."""
    torch.manual_seed(0)
    config = load_davenet_config("davenet_tiny").to_dict()
    config["image"]["cspdarknet_strides"] = [8, 16, 32]
    model = Davenet(DavenetConfig.from_dict(config)).eval()
    images = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        image_map = model.encode_images(images)
        features = model.image_encoder.backbone(images)
        encoder = model.image_encoder
        level_means = (encoder.finer_embedders["8"](features[0]).mean(dim=(2, 3))
                       + encoder.finer_embedders["16"](features[1]).mean(dim=(2, 3))
                       + encoder.embedder(features[2]).mean(dim=(2, 3)))
    assert image_map.shape == (2, 128, 20, 20)
    torch.testing.assert_close(model.pool_images(image_map), level_means, rtol=1e-4, atol=1e-4)
    config["image"]["cspdarknet_strides"] = [8, 16]
    with pytest.raises(ValueError, match="cspdarknet_strides"):
        DavenetConfig.from_dict(config)


SCENE = [SceneObject("star", "blue", "small", (200, 10, 240, 50)),
         SceneObject("circle", "red", "big", (10, 10, 90, 90)),
         SceneObject("cross", "green", "big", (300, 10, 380, 90))]


def test_scene_caption_names_every_object_in_the_order_given():
    caption = scene_caption(SCENE)
    assert caption == "a small blue star, a big red circle and a big green cross"
    assert caption_words(caption)[:5] == ["a", "small", "blue", "star", "a"]


def test_caption_order_is_left_to_right_or_drawn_per_caption_with_the_same_voice(tmp_path):
    left_to_right = SynthConfig(out=tmp_path / "ltr", noise_prob=0.0)
    drawn = SynthConfig(out=tmp_path / "random", noise_prob=0.0, caption_order="random")
    phrases = sorted(scene_caption([obj]) for obj in SCENE)
    orders = set()
    for index in range(6):
        ordered = generate.generate_caption(left_to_right, "train", index, index, SCENE)
        shuffled = generate.generate_caption(drawn, "train", index, index, SCENE)
        assert ordered["sent"] == "a big red circle, a small blue star and a big green cross"
        assert {k: shuffled[k] for k in ("speaker", "rate", "pitch")} == \
            {k: ordered[k] for k in ("speaker", "rate", "pitch")}
        words = caption_words(shuffled["sent"])
        assert [w["word"] for w in shuffled["words"]] == words
        spoken = [" ".join(words[i:i + 4]) for i in (0, 4, 9)]  # "and" is word 8
        assert sorted(spoken) == phrases and words[8] == "and"
        orders.add(tuple(spoken))
    assert len(orders) > 1
    with pytest.raises(ValueError, match="caption_order"):
        generate.generate_dataset(SynthConfig(out=tmp_path / "bad", captions=True, caption_order="sorted"), COUNTS)


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("davenet_data")
    cfg = SynthConfig(out=out, seed=7, noise_prob=0.0, carrier_prob=0.0, backgrounds=("plain",), captions=True,
                      referents_per_scene=REFERENTS)
    generate.generate_dataset(cfg, COUNTS, workers=1)
    return out


def test_captions_have_exact_word_alignments_and_leave_the_rest_unchanged(captions, tmp_path):
    annotations = json.loads((captions / "anns" / "spoken_shapes.json").read_text())
    assert len(annotations["train"]) > COUNTS["train"]  # some scenes have two referents
    for entry in annotations["train"]:
        caption = entry["caption"]
        assert [w["word"] for w in caption["words"]] == caption_words(caption["sent"])
        assert len(caption["words"]) == 4 * len(entry["objects"]) + 1  # "a <size> <colour> <shape>" + "and"
        wave, rate = sf.read(captions / "audios" / "spoken_shapes_captions" / caption["speaker"] / f"{entry['iid']}.wav")
        assert rate == 16000
        ends = [0.0] + [w["end"] for w in caption["words"]]
        for previous_end, word in zip(ends, caption["words"]):
            assert previous_end < word["start"] < word["end"] <= len(wave) / rate
            inside = wave[math.ceil(word["start"] * rate):int(word["end"] * rate)]
            assert np.abs(inside).max() > 0.01  # speech within the word's span
        # Between words and before the first one: digital silence (no noise in this set).
        gap = wave[int(caption["words"][0]["end"] * rate) + 1:math.floor(caption["words"][1]["start"] * rate)]
        assert np.all(gap == 0)

    plain = tmp_path / "plain"
    generate.generate_dataset(SynthConfig(out=plain, seed=7, noise_prob=0.0, carrier_prob=0.0, backgrounds=("plain",),
                                          referents_per_scene=REFERENTS), COUNTS, workers=1)
    without = json.loads((plain / "anns" / "spoken_shapes.json").read_text())
    assert without == {split: [{k: v for k, v in e.items() if k != "caption"} for e in entries]
                       for split, entries in annotations.items()}
    for path in sorted((plain / "images").iterdir()) + sorted((plain / "audios" / "spoken_shapes").rglob("*.wav")):
        assert path.read_bytes() == (captions / path.relative_to(plain)).read_bytes()


@pytest.mark.parametrize("voice", ["flite:slt", "festival:kal"])
def test_captions_in_other_engines_voices_are_aligned_word_by_word(voice):
    words = ["a", "big", "red", "circle"]
    wave, spans = render_word_sequence(np.random.default_rng(0), words, voice, rate=170, pitch=50, snr_db=None)
    assert len(spans) == len(words)
    for (start, end), (next_start, _) in zip(spans, spans[1:] + [(len(wave) / SAMPLE_RATE, None)]):
        assert 0 < start < end < next_start
        assert np.abs(wave[math.ceil(start * SAMPLE_RATE):int(end * SAMPLE_RATE)]).max() > 0.01
        assert np.all(wave[int(end * SAMPLE_RATE) + 1:math.floor(next_start * SAMPLE_RATE)] == 0)


def test_word_detection_scores_a_perfect_and_a_useless_code():
    words = [(("a", 0.0, 0.1), ("red", 0.1, 0.3), ("circle", 0.3, 0.6))]
    # One code per word at 0.1 s frames: code 5 exactly during "red", 7 during "circle".
    perfect = [np.array([1, 5, 5, 7, 7, 7])]
    report = davenet.word_detection(perfect, 0.1, words, window_s=0.0, stop_words=["a"])
    assert report == {"word_f1": 1.0, "words_f1_50": 2, "vocabulary": 2}
    # Codes alternating regardless of the words. Segment centres 0.05 ("a"), 0.15 (red), 0.25 (red),
    # 0.35, 0.45, 0.55 (circle): code 3 has precision 1/3 for each word, code 4 1/3 for red and
    # 2/3 for circle; both occur during both words (recall 1). Best F1: red 0.5, circle 0.8.
    useless = [np.array([3, 4, 3, 4, 3, 4])]
    report = davenet.word_detection(useless, 0.1, words, 0.0, ["a"])
    assert report == {"word_f1": pytest.approx(0.65), "words_f1_50": 2, "vocabulary": 2}


def test_caption_split_has_one_pair_per_image_and_every_expression_as_a_query(captions):
    data = davenet.load_train_config(CONFIG, [f"data.root={captions}"]).data
    annotations = json.loads((captions / "anns" / "spoken_shapes.json").read_text())
    split = davenet.read_caption_split(data, "train")
    iids = list(dict.fromkeys(entry["iid"] for entry in annotations["train"]))
    assert [pair.image_path.name for pair in split.pairs] == [f"{iid:012d}.jpg" for iid in iids]
    assert len(split.queries) == len(annotations["train"])
    for query, entry in zip(split.queries, annotations["train"]):
        assert query.audio_path.is_file() and query.audio_path.parent.parent.name == "spoken_shapes"
        assert iids[query.pair_index] == entry["iid"]
        # The scene the expression was said about holds exactly its target as the referent.
        pair = split.pairs[query.pair_index]
        height, width = read_image_rgb(pair.image_path).shape[:2]
        assert referents(query.expression, list(pair.objects), width, height) == [entry["target_index"]]


def test_training_on_commands_adds_each_expression_paired_with_its_scene(captions):
    cfg = davenet.load_train_config(CONFIG, [f"data.root={captions}", "task.train_on_commands=true"])
    task = davenet.DavenetTask(cfg, davenet.davenet_model_config(cfg), None)
    assert task.best_metric == "semantic_r1" and davenet.DavenetTask.best_metric == "r10_mean"
    split = davenet.read_caption_split(cfg.data, "train")
    training = task.build_dataset("train", train=True)
    assert len(training) == len(split.pairs) + len(split.queries)
    assert training.pairs[:len(split.pairs)] == split.pairs
    for query, pair in zip(split.queries, training.pairs[len(split.pairs):]):
        assert pair.audio_path == query.audio_path and pair.words is None
        assert pair.image_path == split.pairs[query.pair_index].image_path
    assert task.build_dataset("val", train=False).pairs == davenet.read_caption_split(cfg.data, "val").pairs
    # A scene is never the impostor of a command that fits it, nor of its own utterances.
    batch = training.pairs[:3] + training.pairs[len(split.pairs):len(split.pairs) + 3]
    sizes = [read_image_rgb(pair.image_path).shape[:2] for pair in batch]
    allowed = davenet.command_impostors(batch, sizes)
    for i, (scene, (height, width)) in enumerate(zip(batch, sizes)):
        for j, utterance in enumerate(batch):
            fits = utterance.expression is not None and bool(
                referents(utterance.expression, list(scene.objects), width, height))
            assert allowed[i, j].item() == (scene.image_path != utterance.image_path and not fits)
    assert not allowed[:3, :3].diagonal().any() and allowed[:3, :3].sum() == 6  # captions fit one scene


def test_semantic_recall_of_hand_made_scenes():
    box = (0.0, 0.0, 10.0, 10.0)
    scenes = [(SceneObject("circle", "red", "big", box),), (SceneObject("star", "red", "big", box),),
              (SceneObject("circle", "blue", "small", box), SceneObject("star", "red", "small", box))]
    pairs = [davenet.CaptionPair(Path(f"{i}.jpg"), Path(f"{i}.wav"), objects=objects) for i, objects in enumerate(scenes)]
    queries = [davenet.ExpressionQuery(Path("q0.wav"), parse_expression("the circle"), 0),
               davenet.ExpressionQuery(Path("q1.wav"), parse_expression("the red star"), 1),
               davenet.ExpressionQuery(Path("q2.wav"), parse_expression("the blue circle"), 2)]
    # Best images: 2 (has a circle: hit), 0 (no star: miss), 2 (its own scene: hit).
    scores = torch.tensor([[0.0, 5.0, 0.0], [1.0, 0.0, 0.0], [2.0, 1.0, 3.0]])
    report = davenet.semantic_recall(scores, queries, pairs, [(100, 100)] * 3)
    # Chance: circles in 2 of 3 scenes, red stars in 2, blue circles in 1.
    assert report == {"queries": 3, "semantic_r1": pytest.approx(2 / 3), "chance_semantic_r1": pytest.approx(5 / 9),
                      "no_place_queries": 3, "semantic_r1_no_place": pytest.approx(2 / 3),
                      "chance_semantic_r1_no_place": pytest.approx(5 / 9)}
    # A place-word query about scene 3 (two stars side by side); its own image scores highest.
    boxes = ((0.0, 0.0, 10.0, 10.0), (80.0, 0.0, 90.0, 10.0))
    pairs.append(davenet.CaptionPair(Path("3.jpg"), Path("3.wav"), objects=tuple(
        SceneObject("star", "red", "big", b) for b in boxes)))
    queries.append(davenet.ExpressionQuery(Path("q3.wav"), parse_expression("the star on the left"), 3))
    scores = torch.cat([torch.cat([scores, torch.zeros(3, 1)], dim=1), torch.tensor([[0.0, 0.0, 0.0, 1.0]])])
    report = davenet.semantic_recall(scores, queries, pairs, [(100, 100)] * 4)
    # The star on the left: in scene 3 (two stars, one left of the other); scenes 1 and 2 have one
    # star each, which is also "the star on the left" there (no other star rules it out).
    assert report["place_queries"] == 1 and report["semantic_r1_place"] == 1.0
    assert report["chance_semantic_r1_place"] == pytest.approx(3 / 4)


def test_retrieval_recalls_of_a_hand_made_matrix():
    scores = torch.tensor([[5.0, 0.0, 0.0], [6.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    recalls = davenet.retrieval_recalls(scores)
    # Caption 0 finds image 1 first; captions 1 and 2 find theirs. Image 1 prefers caption 0.
    assert recalls["s2i_r1"] == pytest.approx(2 / 3) and recalls["i2s_r1"] == pytest.approx(2 / 3)
    assert recalls["s2i_r5"] == recalls["i2s_r10"] == recalls["r10_mean"] == 1.0


def test_subset_recalls_scale_with_the_chance_that_an_impostor_is_drawn():
    pairs = 10
    scores = torch.eye(pairs) + 2 * torch.roll(torch.eye(pairs), shifts=1, dims=0)  # image j+1 outranks caption j's own
    whole = davenet.retrieval_recalls(scores)
    assert whole["s2i_r1"] == whole["i2s_r1"] == 0.0
    assert davenet.subset_recalls(scores, pairs, draws=3) == {f"subset{pairs}_{k}": v for k, v in whole.items()}
    # In 4 of the 10 pairs, a caption's impostor is among the other 3 with probability 3/9.
    recalls = davenet.subset_recalls(scores, 4, draws=2000)
    assert recalls["subset4_s2i_r1"] == pytest.approx(1 - 3 / 9, abs=0.03)
    assert recalls["subset4_i2s_r1"] == pytest.approx(1 - 3 / 9, abs=0.03)
    assert recalls["subset4_s2i_r5"] == 1.0
    with pytest.raises(ValueError, match="between 2 and the number of pairs"):
        davenet.subset_recalls(scores, 11)


def test_training_evaluation_warm_start_units_and_retrieval(captions, tmp_path, capsys):
    common = [f"data.root={captions}", "batch_size=4", "eval_batch_size=8", "epochs=1", "data.num_workers=0",
              "log_every=1"]
    result = davenet.main(["--config", str(CONFIG), f"output_dir={tmp_path / 'none'}", *common])
    assert result["global_step"] == 2
    metrics = json.loads((tmp_path / "none" / "best" / "metrics.json").read_text())
    assert metrics["pairs"] == COUNTS["val"] and 0.0 <= metrics["s2i_r1"] <= metrics["s2i_r5"] <= 1.0
    assert metrics["queries"] > COUNTS["val"] and 0.0 <= metrics["semantic_r1"] <= 1.0
    assert 0.0 < metrics["chance_semantic_r1"] <= 1.0
    assert not any(key.startswith("vq") for key in metrics)

    # Staged schedule: {} -> {2,3}; only the two new codebooks start fresh.
    davenet.main(["--config", str(CONFIG), f"output_dir={tmp_path / 'vq23'}", *common,
                  "model_overrides.speech.vq_layers=[2,3]", f"task.warm_start={tmp_path / 'none' / 'best'}"])
    metrics = json.loads((tmp_path / "vq23" / "best" / "metrics.json").read_text())
    for slot in (2, 3):
        assert 1.0 <= metrics[f"vq{slot}_perplexity"] <= 256
        assert 0.0 < metrics[f"vq{slot}_used"] <= 1.0
        assert 0.0 <= metrics[f"vq{slot}_word_f1"] <= 1.0 and metrics[f"vq{slot}_vocabulary"] > 0
    seed = davenet.build_davenet_from_checkpoint(tmp_path / "none" / "best")[0].state_dict()
    warm = davenet.Davenet(davenet.davenet_model_config(davenet.load_train_config(
        CONFIG, ["model_overrides.speech.vq_layers=[2,3]"])))
    davenet.load_warm_start(warm, tmp_path / "none" / "best")
    assert torch.equal(warm.state_dict()["speech_encoder.conv1.weight"], seed["speech_encoder.conv1.weight"])
    fewer = davenet.Davenet(davenet.davenet_model_config(davenet.load_train_config(
        CONFIG, ["model_overrides.speech.vq_layers=[3]"])))
    with pytest.raises(ValueError, match="not a subset"):
        davenet.load_warm_start(fewer, tmp_path / "vq23" / "best")

    # Units of one caption, per frame and deduplicated.
    annotations = json.loads((captions / "anns" / "spoken_shapes.json").read_text())
    caption = annotations["test"][0]["caption"]
    wav = captions / "audios" / "spoken_shapes_captions" / caption["speaker"] / f"{caption['sent_id']}.wav"
    capsys.readouterr()
    units = davenet.main(["units", "--checkpoint", str(tmp_path / "vq23" / "best"), str(wav), "--layer", "3"])
    frames_40ms = math.ceil(math.ceil((1 + len(sf.read(wav)[0]) // 160) / 2) / 2)
    assert len(units[3]) == frames_40ms and capsys.readouterr().out.startswith("vq3: ")
    deduplicated = davenet.main(["units", "--checkpoint", str(tmp_path / "vq23" / "best"), str(wav), "--dedup"])
    assert set(deduplicated) == {2, 3}
    assert all(a != b for a, b in zip(deduplicated[3], deduplicated[3][1:]))
    assert [u for i, u in enumerate(units[3]) if i == 0 or u != units[3][i - 1]] == deduplicated[3]

    # Test-split evaluation reports chance, and recalls over subsets of the size asked for.
    metrics = davenet.main(["evaluate", "--config", str(CONFIG), "--checkpoint", str(tmp_path / "vq23" / "best"),
                            "--split", "test", f"data.root={captions}", "data.num_workers=0", "--subset-pairs", "2"])
    assert metrics["pairs"] == COUNTS["test"] and metrics["chance_r10"] == 1.0
    assert metrics["subset2_s2i_r1"] >= 0.0 and metrics["subset2_s2i_r5"] == 1.0
    # The fit on the first training pairs, with only the commands said about them.
    train = davenet.read_caption_split(davenet.load_train_config(CONFIG, [f"data.root={captions}"]).data, "train")
    fit = davenet.main(["evaluate", "--config", str(CONFIG), "--checkpoint", str(tmp_path / "vq23" / "best"),
                        "--split", "train", f"data.root={captions}", "data.num_workers=0", "--max-pairs", "3"])
    assert fit["pairs"] == 3 and fit["chance_r1"] == pytest.approx(1 / 3)
    assert fit["queries"] == sum(query.pair_index < 3 for query in train.queries) < len(train.queries)
    with pytest.raises(SystemExit):
        davenet.main(["evaluate", "--config", str(CONFIG), "--checkpoint", str(tmp_path / "vq23" / "best"),
                      "--split", "train", f"data.root={captions}", "--max-pairs", "1"])

    # The robot's retrieval CLI (csref_model only), in its own process.
    cmd = [sys.executable, "-m", "csref_model", "retrieve", "--checkpoint", str(tmp_path / "vq23" / "best"),
           "--audio", str(wav), "--images", str(captions / "images"), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ranking = json.loads(done.stdout)["ranking"]
    assert len(ranking) == sum(COUNTS.values())
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)
    done = subprocess.run(cmd[:-3] + ["--images", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert done.returncode == 2 and "nowhere" in done.stderr


def test_best_view_picks_the_highest_scoring_labelled_view(captions):
    torch.manual_seed(0)
    model = Davenet(load_davenet_config("davenet_tiny"))
    images = [read_image_rgb(path) for path in sorted((captions / "images").iterdir())[:5]]
    views = [(f"/camera_{index}/image_raw", image) for index, image in enumerate(images)]
    wave, sample_rate = sf.read(next((captions / "audios" / "spoken_shapes_captions").rglob("*.wav")), dtype="float32")
    # BatchNorm statistics of these images, so that an untrained model's scores differ between them.
    with torch.no_grad():
        for _ in range(20):
            model.train().encode_images(image_batch(images, model.image_size))
    retriever = SpeechImageRetriever(model, batch_size=2)
    # Each view scored alone (eval-mode BatchNorm: a view's score does not depend on its batch).
    alone = np.array([retriever.scores(wave, sample_rate, [image])[0] for image in images])
    assert alone.max() - np.sort(alone)[-2] > 1e-3
    chosen = best_view(retriever, wave, sample_rate, views)
    assert chosen.index == int(alone.argmax()) and chosen.label == f"/camera_{chosen.index}/image_raw"
    assert chosen.score == pytest.approx(alone.max(), rel=1e-4, abs=1e-4)
    assert [label for label, _ in chosen.ranking] == [views[i][0] for i in np.argsort(-alone, kind="stable")]
    assert chosen.margin == pytest.approx(chosen.ranking[0][1] - chosen.ranking[1][1]) and chosen.margin >= 0
    # A single view has no runner-up.
    assert best_view(retriever, wave, sample_rate, views[2:3]).margin == math.inf
    with pytest.raises(ValueError, match="at least one"):
        best_view(retriever, wave, sample_rate, [])
    with pytest.raises(ValueError, match="uint8 RGB"):
        best_view(retriever, wave, sample_rate, [("gray", images[0][:, :, 0])])
