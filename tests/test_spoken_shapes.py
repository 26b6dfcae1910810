"""Spoken Shapes generator: layout, determinism, expressions and their parsing, drawing and audio."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf

from csref_model.audio import resample
from csref_training.spoken_shapes import generate, grammar, render, scene, speech
from csref_training.spoken_shapes.generate import SynthConfig
from csref_training.spoken_shapes.grammar import Expression, SceneObject

COUNTS = {"train": 6, "val": 2, "test": 3}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    """Every generated file's bytes, keyed by relative path (the provenance file excluded)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith("_generator.json")
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes")
    cfg = SynthConfig(out=out, seed=3, noise_prob=0.0)
    annotations = generate.generate_dataset(cfg, COUNTS, workers=1)
    return out, annotations


def test_layout_matches_refcoco_speech(dataset):
    out, annotations = dataset
    on_disk = json.loads((out / "anns" / "spoken_shapes.json").read_text())
    assert on_disk == annotations
    assert {k: len(v) for k, v in on_disk.items()} == COUNTS
    iids = [e["iid"] for split in generate.SPLITS for e in on_disk[split]]
    assert len(set(iids)) == len(iids)
    for split in generate.SPLITS:
        for entry in on_disk[split]:
            assert set(entry) == {"iid", "bbox", "objects", "target_index", "sent_ids", "refs"}
            assert 3 <= len(entry["objects"]) <= 6
            assert entry["objects"][entry["target_index"]]["bbox"] == entry["bbox"]
            for obj in entry["objects"]:
                assert obj["shape"] in grammar.SHAPES and obj["colour"] in grammar.COLOURS
            # The target's attributes are all consistent with its spoken description.
            target = entry["objects"][entry["target_index"]]
            assert target["shape"] in entry["refs"][0]["sent"].split()
            assert [r["sent_id"] for r in entry["refs"]] == entry["sent_ids"]
            image = cv2.imread(str(out / "images" / f"{entry['iid']:012d}.jpg"))
            assert image is not None
            height, width = image.shape[:2]
            assert 320 <= width <= 640 and 320 <= height <= 640
            x, y, w, h = entry["bbox"]
            assert all(isinstance(v, float) for v in entry["bbox"])
            assert x >= scene.BOX_MARGIN_PX and y >= scene.BOX_MARGIN_PX
            assert x + w <= width - scene.BOX_MARGIN_PX and y + h <= height - scene.BOX_MARGIN_PX
            assert w >= 0.09 * min(width, height) * 0.85 and h >= 0.09 * min(width, height) * 0.85
            for ref in entry["refs"]:
                assert ref["speaker"] in {speech.speaker_dir_name(v) for v in speech.TRAIN_VOICES}
                assert (out / "audios" / "spoken_shapes" / ref["speaker"] / f"{ref['sent_id']}.wav").is_file()
                words = ref["sent"].split()
                assert ref["sent"] == ref["sent"].lower() and "the" in words
                assert any(shape in words for shape in grammar.SHAPES)


def test_audio_format_and_silence_padding(dataset):
    out, annotations = dataset
    wavs = sorted((out / "audios" / "spoken_shapes").rglob("*.wav"))
    assert len(wavs) == sum(COUNTS.values())
    for path in wavs:
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        samples, _ = sf.read(path, dtype="int16")
        voiced = np.flatnonzero(samples != 0)
        lead, trail = voiced[0], len(samples) - 1 - voiced[-1]
        # Without noise the padding is digital silence of 0.1-0.5 s on each side.
        assert 0.1 * 16000 <= lead <= 0.5 * 16000, path
        assert 0.1 * 16000 <= trail <= 0.5 * 16000, path
        assert 0.3 <= np.abs(samples).max() / 32768 <= 0.9 + 1e-3
        assert voiced[-1] - voiced[0] > 0.4 * 16000  # at least a spoken expression's length


def test_same_seed_same_bytes_for_any_worker_count(tmp_path):
    counts = {"train": 5, "val": 1, "test": 2}
    runs = []
    for name, workers in (("a", 1), ("b", 2)):
        cfg = SynthConfig(out=tmp_path / name, seed=11, backgrounds=("photo", "gradient"))
        generate.generate_dataset(cfg, counts, workers=workers)
        runs.append(_tree_bytes(tmp_path / name))
    assert runs[0] == runs[1]
    other = SynthConfig(out=tmp_path / "c", seed=12, backgrounds=("photo", "gradient"))
    generate.generate_dataset(other, counts, workers=1)
    assert _tree_bytes(tmp_path / "c")["anns/spoken_shapes.json"] != runs[0]["anns/spoken_shapes.json"]


def test_noise_is_added_at_the_requested_snr(tmp_path):
    cfg = SynthConfig(out=tmp_path, seed=5, noise_prob=1.0, snr_db_range=(15.0, 15.0))
    annotations = generate.generate_dataset(cfg, {"train": 4}, workers=1)
    for entry in annotations["train"]:
        ref = entry["refs"][0]
        assert ref["snr_db"] == 15.0
        wave, _ = sf.read(tmp_path / "audios" / "spoken_shapes" / ref["speaker"] / f"{ref['sent_id']}.wav")
        # Noise alone is in the first 0.1 s; speech + noise fills the middle.
        noise_power = np.mean(wave[:1600] ** 2)
        assert noise_power > 0
        middle = wave[len(wave) // 2 - 2000:len(wave) // 2 + 2000]
        assert np.mean(middle ** 2) > 3 * noise_power


def test_existing_dataset_is_not_overwritten(dataset):
    out, _ = dataset
    with pytest.raises(FileExistsError, match="spoken_shapes.json"):
        generate.generate_dataset(SynthConfig(out=out), {"train": 1}, workers=1)


def test_cli_writes_dataset_and_rejects_unknown_voice(tmp_path):
    cmd = [sys.executable, "-m", "csref_training.spoken_shapes", "--out", str(tmp_path / "d"), "--train", "3",
           "--val", "1", "--test", "1", "--voices", "en-gb+f2,en-us+m3", "--no-noise", "--workers", "1",
           "--dataset-name", "tiny_shapes", "--backgrounds", "plain"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "samples/s" in done.stdout
    annotations = json.loads((tmp_path / "d" / "anns" / "tiny_shapes.json").read_text())
    speakers = {r["speaker"] for split in annotations.values() for e in split for r in e["refs"]}
    assert speakers <= {"en-gb+f2", "en-us+m3"}
    assert all(r["snr_db"] is None for split in annotations.values() for e in split for r in e["refs"])
    info = json.loads((tmp_path / "d" / "tiny_shapes_generator.json").read_text())
    assert info["counts"] == {"train": 3, "val": 1, "test": 1} and list(info["tts_engines"]) == ["espeak"]
    assert "espeak" in info["tts_engines"]["espeak"].lower()

    bad = cmd[:-6] + ["--voices", "en-us+nosuchvariant", "--out", str(tmp_path / "e")]
    done = subprocess.run(bad, capture_output=True, text=True)
    assert done.returncode == 2 and "en-us+nosuchvariant" in done.stderr


def test_voice_lists_are_valid_and_disjoint():
    speech.check_voices(list(speech.TRAIN_VOICES) + list(speech.HELDOUT_VOICES))
    assert not set(speech.TRAIN_VARIANTS) & set(speech.HELDOUT_VARIANTS)
    assert not set(speech.TRAIN_VOICES) & set(speech.HELDOUT_VOICES)
    assert len(speech.TRAIN_VOICES) >= 8 * 20
    with pytest.raises(ValueError, match="xx-nolang"):
        speech.check_voices(["en-us+m3", "xx-nolang"])
    assert speech.speaker_dir_name("en-us+Mr serious") == "en-us+Mr_serious"


OTHER_ENGINE_VOICES = speech.FLITE_TRAIN_VOICES + speech.FLITE_HELDOUT_VOICES + speech.FESTIVAL_TRAIN_VOICES + speech.FESTIVAL_HELDOUT_VOICES


@pytest.mark.parametrize("voice", ("espeak:en-gb+f3",) + OTHER_ENGINE_VOICES)
def test_every_engine_voice_speaks_at_16k_and_follows_the_rate(voice):
    slow = speech.synthesize("pick up the red circle", voice, rate=130, pitch=30)
    fast = speech.synthesize("pick up the red circle", voice, rate=210, pitch=70)
    for wave in (slow, fast):
        assert wave.dtype == np.float32 and wave.ndim == 1
        assert np.sqrt(np.mean(wave ** 2)) > 0.01  # speech, not silence
        assert 0.5 * 16000 < len(wave) < 5 * 16000  # at SAMPLE_RATE: a 5-word command lasts about 1-3 s
    assert len(slow) > 1.25 * len(fast)


def test_bare_and_prefixed_espeak_voices_are_the_same_voice():
    bare = speech.synthesize("the blue star", "en-gb+f3", rate=160, pitch=50)
    np.testing.assert_array_equal(bare, speech.synthesize("the blue star", "espeak:en-gb+f3", rate=160, pitch=50))
    np.testing.assert_array_equal(bare, resample(speech.espeak("the blue star", "en-gb+f3", 160, 50), speech.ESPEAK_SAMPLE_RATE))
    assert speech.speaker_dir_name("espeak:en-gb+f3") == "en-gb+f3"
    assert speech.speaker_dir_name("flite:slt") == "flite_slt"
    assert speech.speaker_dir_name("festival:slt_hts") == "festival_slt_hts"


def test_text_that_looks_like_an_option_is_spoken():
    for voice in ("en-us", "flite:kal16", "festival:kal"):
        assert np.sqrt(np.mean(speech.synthesize("-v --help", voice, rate=175, pitch=50) ** 2)) > 0.01


def test_engine_voice_lists_are_valid_and_disjoint():
    speech.check_voices(list(OTHER_ENGINE_VOICES))
    for engine in ("flite", "festival"):
        train, heldout = speech.VOICE_SETS[f"{engine}-train"], speech.VOICE_SETS[f"{engine}-heldout"]
        assert train and heldout and not set(train) & set(heldout)
        assert {speech.parse_voice(v).engine for v in train + heldout} == {engine}
    # The held-out slt speaker of festival is not among the flite training voices either.
    assert "flite:slt" not in speech.FLITE_TRAIN_VOICES


def test_unknown_engines_and_voices_are_rejected():
    with pytest.raises(ValueError, match="unknown TTS engine 'xx'"):
        speech.check_voices(["xx:foo"])
    with pytest.raises(ValueError, match="unknown TTS engine"):
        speech.synthesize("the red circle", "sapi:david", 160, 50)
    with pytest.raises(ValueError, match="flite voice.*nobody"):
        speech.check_voices(["flite:kal", "flite:nobody"])
    with pytest.raises(ValueError, match="festival voice.*nobody"):
        speech.synthesize("the red circle", "festival:nobody", 160, 50)
    with pytest.raises(ValueError, match="names no flite voice"):
        speech.parse_voice("flite:")


def test_generator_mixes_engines(tmp_path):
    voices = ("en-gb+f2", "flite:slt", "festival:kal", "festival:slt_hts")
    cfg = SynthConfig(out=tmp_path, seed=2, voices=voices, noise_prob=0.0, backgrounds=("plain",))
    annotations = generate.generate_dataset(cfg, {"train": 12}, workers=1)
    speakers = [entry["refs"][0]["speaker"] for entry in annotations["train"]]
    assert set(speakers) <= {speech.speaker_dir_name(v) for v in voices}
    assert len(set(speakers)) >= 3
    for entry in annotations["train"]:
        ref = entry["refs"][0]
        path = tmp_path / "audios" / "spoken_shapes" / ref["speaker"] / f"{ref['sent_id']}.wav"
        assert sf.info(path).samplerate == 16000
        samples, _ = sf.read(path, dtype="int16")
        assert 0.3 <= np.abs(samples).max() / 32768 <= 0.9 + 1e-3


def test_cli_takes_engine_voice_sets_and_rejects_unknown_engines(tmp_path):
    base = [sys.executable, "-m", "csref_training.spoken_shapes", "--train", "2", "--val", "0", "--test", "0",
            "--no-noise", "--workers", "1", "--backgrounds", "plain"]
    done = subprocess.run(base + ["--out", str(tmp_path / "a"), "--voice-set", "flite-heldout,festival-heldout"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    info = json.loads((tmp_path / "a" / "spoken_shapes_generator.json").read_text())
    assert info["voices"] == ["flite:slt", "festival:slt_hts"]
    assert set(info["tts_engines"]) == {"flite", "festival"} and "2.5" in info["tts_engines"]["festival"]
    for args, message in ((["--voices", "en-us,xx:foo"], "unknown TTS engine"), (["--voice-set", "train,nosuchset"], "nosuchset")):
        done = subprocess.run(base + ["--out", str(tmp_path / "b")] + args, capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, done.stderr


# --------------------------------------------------------------------------------------
# Referring expressions
# --------------------------------------------------------------------------------------
def _obj(cx: float, cy: float, shape="circle", colour="red", size="small", r=20.0) -> SceneObject:
    return SceneObject(shape, colour, size, (cx - r, cy - r, cx + r, cy + r))


def _all_expressions(target: SceneObject):
    for colour, size, horizontal, vertical in itertools.product(
        (None, target.colour), (None, target.size), (None, "left", "right", "middle"), (None, "top", "bottom")
    ):
        yield Expression(target.shape, colour, size, horizontal, vertical)


def test_place_words_pick_the_extreme_candidate_with_margin():
    w, h = 640, 480
    pair = [_obj(100, 200), _obj(300, 200)]
    assert grammar.referents(Expression("circle", horizontal="left"), pair, w, h) == [0]
    assert grammar.referents(Expression("circle", horizontal="right"), pair, w, h) == [1]
    assert grammar.referents(Expression("circle", vertical="top"), pair, w, h) == []
    rng = np.random.default_rng(0)
    assert grammar.describe(0, pair, w, h, rng) == Expression("circle", horizontal="left")
    # Exactly 10% of the width apart still counts; just under it does not.
    assert grammar.referents(Expression("circle", horizontal="left"), [_obj(100, 200), _obj(164, 200)], w, h) == [0]
    close = [_obj(100, 200), _obj(163.9, 200)]
    assert grammar.referents(Expression("circle", horizontal="left"), close, w, h) == []
    assert grammar.describe(0, close, w, h, rng) is None
    # Objects of another shape or colour are not candidates.
    mixed = [_obj(300, 200), _obj(100, 200, colour="blue"), _obj(50, 200, shape="star")]
    assert grammar.referents(Expression("circle", horizontal="left"), mixed, w, h) == [1]
    assert grammar.referents(Expression("circle", "red", horizontal="left"), mixed, w, h) == [0]


def test_two_place_words_and_middle():
    w, h = 600, 600
    grid = [_obj(100, 100), _obj(500, 100), _obj(100, 400), _obj(500, 400)]
    assert grammar.referents(Expression("circle", horizontal="left", vertical="top"), grid, w, h) == [0]
    assert grammar.referents(Expression("circle", horizontal="left"), grid, w, h) == []
    assert grammar.describe(3, grid, w, h, np.random.default_rng(0)) == Expression(
        "circle", horizontal="right", vertical="bottom")
    # Anti-diagonal: each is left-or-top of the other, so "on the left at the top" is ambiguous.
    diagonal = [_obj(100, 400), _obj(400, 100)]
    assert grammar.referents(Expression("circle", horizontal="left", vertical="top"), diagonal, w, h) == [0, 1]
    row = [_obj(60, 300), _obj(300, 300), _obj(540, 300)]
    assert grammar.referents(Expression("circle", horizontal="middle"), row, w, h) == [1]
    # The nearest to the centre line must still lie in the central quarter of the width.
    assert grammar.referents(Expression("circle", horizontal="middle"), [_obj(60, 300), _obj(374, 300)], w, h) == [1]
    assert grammar.referents(Expression("circle", horizontal="middle"), [_obj(60, 300), _obj(376, 300)], w, h) == []


def test_colour_and_size_are_preferred_over_place_words():
    w, h = 640, 480
    rng = np.random.default_rng(0)
    colours = [_obj(100, 200), _obj(400, 200, colour="blue")]
    assert grammar.describe(0, colours, w, h, rng) == Expression("circle", colour="red")
    sizes = [_obj(100, 200, size="big", r=60), _obj(400, 200)]
    assert grammar.describe(1, sizes, w, h, rng) == Expression("circle", size="small")
    alone = [_obj(100, 200), _obj(400, 200, shape="square")]
    assert grammar.describe(0, alone, w, h, rng).text == "the circle"
    assert Expression("star", "yellow", "big", "left", "top").text == "the big yellow star on the left at the top"


def test_expressions_are_unique_and_shortest_on_random_scenes():
    for i in range(300):
        rng = np.random.default_rng([42, i])
        width, height = (int(rng.integers(320, 641)) for _ in range(2))
        background = render.make_background(rng, width, height, render.BACKGROUNDS[i % 3])
        objects, target, expression = scene.sample_layout(rng, background)
        assert grammar.referents(expression, objects, width, height) == [target]
        t = objects[target]
        assert expression.shape == t.shape
        assert expression.colour in (None, t.colour) and expression.size in (None, t.size)
        unique = [e for e in _all_expressions(t) if grammar.referents(e, objects, width, height) == [target]]
        assert min(e.num_optional for e in unique) == expression.num_optional
        same_length = [e for e in unique if e.num_optional == expression.num_optional]
        assert min(e.num_place for e in same_length) == expression.num_place


def test_overspecified_commands_add_only_what_holds_and_still_single_out_the_target():
    added = {"colour": 0, "size": 0, "horizontal": 0, "vertical": 0}
    for i in range(200):
        rng = np.random.default_rng([43, i])
        width, height = (int(rng.integers(320, 641)) for _ in range(2))
        background = render.make_background(rng, width, height, "plain")
        objects, target, shortest = scene.sample_layout(rng, background)
        assert grammar.overspecify(shortest, target, objects, width, height, rng, 0.0) == shortest
        richer = grammar.overspecify(shortest, target, objects, width, height, rng, 1.0)
        assert grammar.referents(richer, objects, width, height) == [target]
        t = objects[target]
        assert richer.shape == t.shape and richer.colour == t.colour and richer.size == t.size
        for name in added:
            kept = getattr(shortest, name)
            assert getattr(richer, name) == kept or kept is None
            added[name] += kept is None and getattr(richer, name) is not None
        # An added place holds of the whole image.
        if shortest.horizontal is None and richer.horizontal == "left":
            assert t.cx < width / 3
        if shortest.vertical is None and richer.vertical == "bottom":
            assert t.cy > 2 * height / 3
    assert min(added.values()) > 10, added


def test_only_train_commands_are_overspecified(tmp_path):
    cfg = SynthConfig(out=tmp_path / "over", seed=3, noise_prob=0.0, overspecify_prob=1.0)
    annotations = generate.generate_dataset(cfg, COUNTS, workers=1)
    for entry in annotations["train"]:
        expression = grammar.parse_expression(entry["refs"][0]["sent"])
        target = entry["objects"][entry["target_index"]]
        assert (expression.colour, expression.size) == (target["colour"], target["size"])
    # Validation and test commands stay the shortest: those of the same seed without the option.
    shortest = generate.generate_dataset(SynthConfig(out=tmp_path / "short", seed=3, noise_prob=0.0), COUNTS)
    for split in ("val", "test"):
        assert [e["refs"][0]["sent"] for e in shortest[split]] == [e["refs"][0]["sent"] for e in annotations[split]]
    assert [e["refs"][0]["sent"] for e in shortest["train"]] != [e["refs"][0]["sent"] for e in annotations["train"]]
    with pytest.raises(ValueError, match="overspecify_prob must be in"):
        generate.generate_dataset(SynthConfig(out=tmp_path / "bad", overspecify_prob=1.5), COUNTS)


@pytest.mark.parametrize("scene_scale", [None, (0.05, 0.13)])
def test_random_layouts_respect_counts_margins_and_sizes(scene_scale):
    small_extents = []
    for i in range(200):
        rng = np.random.default_rng([7, i])
        width, height = (int(rng.integers(320, 641)) for _ in range(2))
        objects, _, _ = scene.sample_layout(rng, render.make_background(rng, width, height, "plain"), scene_scale)
        assert 3 <= len(objects) <= 6
        unit = min(width, height)
        small_extents += [max(o.box[2] - o.box[0], o.box[3] - o.box[1]) / unit for o in objects if o.size == "small"]
        assert all(max(o.box[2] - o.box[0], o.box[3] - o.box[1]) <= scene.MAX_EXTENT * unit + 1e-6 for o in objects)
        for o in objects:
            x0, y0, x1, y1 = o.box
            m = scene.BOX_MARGIN_PX
            assert m <= x0 < x1 <= width - m and m <= y0 < y1 <= height - m
        for a, b in itertools.combinations(objects, 2):
            gap_x = max(b.box[0] - a.box[2], a.box[0] - b.box[2])
            gap_y = max(b.box[1] - a.box[3], a.box[1] - b.box[3])
            assert max(gap_x, gap_y) >= scene.BOX_MARGIN_PX
        areas = {s: [(o.box[2] - o.box[0]) * (o.box[3] - o.box[1]) for o in objects if o.size == s]
                 for s in grammar.SIZES}
        if areas["big"] and areas["small"]:
            assert min(areas["big"]) >= 2.5 * max(areas["small"])
    lowest, highest = (scene.SMALL_EXTENT[0], scene.SMALL_EXTENT[1]) if scene_scale is None else \
        (scene_scale[0], scene_scale[1] * scene.SMALL_EXTENT_FACTOR[1])
    assert lowest - 1e-6 <= min(small_extents) < lowest + 0.01 and highest - 0.01 < max(small_extents) <= highest + 1e-6


@pytest.mark.parametrize("shape", grammar.SHAPES)
def test_drawn_shape_fills_its_tight_box(shape):
    rng = np.random.default_rng(1)
    for _ in range(5):
        w, h = scene.shape_box_size(shape, rng.uniform(30, 120))
        x0, y0 = rng.uniform(10, 60, size=2)
        obj = SceneObject(shape, "white", "big", (x0, y0, x0 + w, y0 + h))
        canvas = np.zeros((240, 240, 3), np.uint8)
        render.draw_object(canvas, obj, np.array([255.0, 255.0, 255.0]))
        alpha = canvas[:, :, 0].astype(np.float64) / 255
        cols, rows = np.flatnonzero(alpha.max(0) > 0), np.flatnonzero(alpha.max(1) > 0)
        assert abs(cols[0] - np.floor(x0)) <= 1 and abs(cols[-1] - (np.ceil(x0 + w) - 1)) <= 1
        assert abs(rows[0] - np.floor(y0)) <= 1 and abs(rows[-1] - (np.ceil(y0 + h) - 1)) <= 1
        # Anti-aliased: edge pixels take intermediate values.
        assert np.any((alpha > 0.1) & (alpha < 0.9))
        coverage = alpha.sum() / (w * h)
        expected = {"circle": np.pi / 4, "square": 1.0, "diamond": 0.5, "triangle": 0.5,
                    "cross": 5 / 9, "star": None}[shape]
        if expected is not None:
            assert coverage == pytest.approx(expected, abs=0.03)


def test_parse_expression_inverts_every_expression_text():
    for shape, colour, size, horizontal, vertical in itertools.product(
        grammar.SHAPES, (None, *grammar.COLOURS), (None, *grammar.SIZES),
        (None, *grammar.HORIZONTAL_PLACES), (None, *grammar.VERTICAL_PLACES),
    ):
        expression = Expression(shape, colour, size, horizontal, vertical)
        assert grammar.parse_expression(expression.text) == expression
    assert grammar.parse_expression("Pick up  the small, BLUE square on the left") == Expression(
        "square", "blue", "small", horizontal="left")
    assert grammar.parse_expression("where is the cross at the bottom") == Expression("cross", vertical="bottom")


@pytest.mark.parametrize("text", [
    "the red cup", "red circle", "the circle on the left on the right", "the circle at the top on the left",
    "the blue small square", "please find the star", "",
])
def test_parse_expression_rejects_sentences_outside_the_grammar(text):
    with pytest.raises(ValueError, match="is not a Spoken Shapes command. Say: "):
        grammar.parse_expression(text)


@pytest.mark.parametrize("text", [
    "the red circle",
    "pick up the circle",
    "grab the small blue square on the left",
    "the big yellow star at the top",
    "find the white cross in the middle at the bottom",
])
def test_scene_for_text_is_one_the_generator_would_describe_so(text):
    expression = grammar.parse_expression(text)
    for seed in range(3):
        rng = np.random.default_rng([7, seed])
        background = render.make_background(rng, 560, 420, "gradient")
        objects, target = scene.layout_for_expression(expression, rng, background)
        assert grammar.referents(expression, objects, 560, 420) == [target]
        shortest = grammar.describe(target, objects, 560, 420, rng)
        assert (shortest.num_optional, shortest.num_place) == (expression.num_optional, expression.num_place)


def test_layout_for_an_impossible_expression_says_why():
    # Three big circles (the target and a twin per place word) 10% of the side apart do not fit
    # between the 8 px border margins of a 60 px canvas.
    rng = np.random.default_rng(0)
    background = render.make_background(rng, 60, 60, "plain")
    with pytest.raises(ValueError, match="could not draw a scene in which \"the big circle on the left at the top\""):
        scene.layout_for_expression(Expression("circle", size="big", horizontal="left", vertical="top"), rng,
                                    background, max_attempts=200)


def test_balance_engines_draws_engines_evenly() -> None:
    """Ten espeak-ng voices and one festival voice: a voice draw gives festival ~1/11 of the time,
    an engine-balanced draw ~1/2, and only ever voices of the list."""
    voices = tuple(speech.TRAIN_VOICES[:10]) + ("festival:kal",)
    draws = 4000
    for balance, expected in ((False, 1 / 11), (True, 0.5)):
        cfg = SynthConfig(out=Path("unused"), voices=voices, balance_engines=balance)
        rng = np.random.default_rng(0)
        picked = [generate.pick_voice(cfg, rng) for _ in range(draws)]
        assert set(picked) <= set(voices)
        assert picked.count("festival:kal") / draws == pytest.approx(expected, abs=0.03)
    assert len(set(picked)) == len(voices)
