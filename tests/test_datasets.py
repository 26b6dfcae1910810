"""Dataset loaders on small generated data: RefCOCO-speech layout (synthetic and official naming),
face sets, the Hugging Face variant, LibriSpeech and CSA pairs, and broken entries."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from csref_model.audio import SAMPLE_RATE, load_audio, resample
from csref_model.preprocessing import prepare_waveform
from csref_training.augment import AugmentConfig
from csref_training.datasets import (
    BrokenEntryError,
    HFSpeechGroundingDataset,
    LibriSpeechDataset,
    SpeechGroundingDataset,
    SpeechTextPairs,
    build_csa_dataset,
    build_srec_dataset,
    collate_csa,
    collate_srec,
    refcoco_layout,
)
from csref_training.reproducibility import SeededItems
from csref_training.spoken_shapes.generate import SynthConfig, generate_dataset
from csref_training.spoken_shapes.speech import ESPEAK_SAMPLE_RATE, espeak
from csref_training.train_config import DataConfig

SIZE = 160
COUNTS = {"train": 6, "val": 3, "test": 3}
SPEAKERS = ("en-us+m3", "en-gb+f2")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A tiny Spoken Shapes set from the real generator."""
    out = tmp_path_factory.mktemp("shapes")
    cfg = SynthConfig(out=out, seed=8, voices=SPEAKERS, noise_prob=0.0, backgrounds=("plain", "photo"))
    generate_dataset(cfg, COUNTS, workers=1)
    return out


def _annotations(root: Path, name: str = "spoken_shapes") -> dict:
    return json.loads((root / "anns" / f"{name}.json").read_text())


def _wav_path(root: Path, ref: dict) -> Path:
    return root / "audios" / "spoken_shapes" / ref["speaker"] / f"{ref['sent_id']}.wav"


@pytest.fixture()
def official(shapes, tmp_path) -> Path:
    """The Spoken Shapes samples rearranged as official refcoco_speech + srefface: COCO file names,
    two speakers that both have every sentence, two sentences per train entry."""
    root = tmp_path / "official"
    anns = _annotations(shapes)
    (root / "images" / "train2014").mkdir(parents=True)
    for split in anns.values():
        for entry in split:
            shutil.copy(shapes / "images" / f"{entry['iid']:012d}.jpg",
                        root / "images" / "train2014" / f"COCO_train2014_{entry['iid']:012d}.jpg")
            ref = entry["refs"][0]
            sentences = [(ref["sent_id"], ref["sent"])]
            if split is anns["train"]:  # a second sentence of the same object
                sentences.append((ref["sent_id"] + 1000, "the same object again"))
                entry["sent_ids"].append(ref["sent_id"] + 1000)
                entry["refs"].append({"sent_id": ref["sent_id"] + 1000, "sent": "the same object again"})
            for speaker in ("spk_a", "spk_b"):
                for sent_id, _ in sentences:
                    target = root / "audios" / "refcoco_speech" / speaker / f"{sent_id}.wav"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(_wav_path(shapes, ref), target)
    refcoco = {"train": anns["train"], "val": anns["val"], "testA": anns["test"]}
    (root / "anns" / "general_object").mkdir(parents=True)
    (root / "anns" / "general_object" / "refcoco_speech.json").write_text(json.dumps(refcoco))
    faces = {split: [{**{k: v for k, v in e.items() if k != "bbox"}, "fbox": e["bbox"]} for e in entries]
             for split, entries in refcoco.items()}
    (root / "anns" / "face_centric").mkdir(parents=True)
    (root / "anns" / "face_centric" / "srefface.json").write_text(json.dumps(faces))
    return root


def test_spoken_shapes_items_match_the_files(shapes):
    data = DataConfig(format="refcoco", dataset="spoken_shapes", root=str(shapes))
    dataset = build_srec_dataset(data, split="test", image_size=SIZE, train=False)
    anns = _annotations(shapes)["test"]
    assert len(dataset) == len(anns) and dataset.num_broken == 0
    for item, entry in zip(dataset, anns):
        ref = entry["refs"][0]
        assert (item["iid"], item["sent_id"], item["sentence"], item["speaker"]) == (
            entry["iid"], ref["sent_id"], ref["sent"], ref["speaker"])
        image = item["image"]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        lb = item["letterbox"]
        x, y, w, h = entry["bbox"]
        np.testing.assert_allclose(item["gt_xyxy"].numpy(), [x, y, x + w, y + h])
        expected = [((x + w / 2) / lb.w * lb.nw + lb.dx) / SIZE, ((y + h / 2) / lb.h * lb.nh + lb.dy) / SIZE,
                    w / lb.w * lb.nw / SIZE, h / lb.h * lb.nh / SIZE]
        np.testing.assert_allclose(item["label"].numpy(), expected, rtol=1e-5)
        assert item["label"].min() >= 0 and item["label"].max() <= 0.99
        wave, sample_rate = load_audio(_wav_path(shapes, ref))
        np.testing.assert_array_equal(item["waveform"], prepare_waveform(wave, sample_rate))
        # The generator's 0.1-0.5 s silence padding is trimmed away.
        assert item["waveform"].dtype == np.float32 and len(item["waveform"]) < len(wave) - 0.15 * SAMPLE_RATE
        assert item["image_path"].endswith(f"{entry['iid']:012d}.jpg")


def test_collate_pads_and_normalises_speech(shapes):
    dataset = build_srec_dataset(DataConfig(dataset="spoken_shapes", root=str(shapes)), "val+test", SIZE, False)
    assert len(dataset) == COUNTS["val"] + COUNTS["test"]
    items = [dataset[i] for i in range(4)]
    batch = collate_srec(items)
    lengths = [len(item["waveform"]) for item in items]
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["label"].shape == (4, 4)
    assert batch["input_values"].shape == (4, max(lengths)) and batch["attention_mask"].dtype == torch.int32
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, length in enumerate(lengths):
        valid = batch["input_values"][row, :length]
        assert abs(valid.mean().item()) < 1e-3 and abs(valid.std().item() - 1) < 1e-2
        assert torch.all(batch["input_values"][row, length:] == 0)
    assert batch["sent_id"] == [item["sent_id"] for item in items]


def test_official_layout_speakers_and_sentences(official):
    layout = refcoco_layout("refcoco_speech", official)
    assert layout.image_pattern == "COCO_train2014_%012d.jpg" and layout.box_key == "bbox"
    evaluation = SpeechGroundingDataset(layout, "train", SIZE, train=False)
    # Evaluation lists every (entry, sentence, speaker): 6 entries x 2 sentences x 2 speakers.
    assert len(evaluation) == COUNTS["train"] * 2 * 2
    assert {(it["sent_id"] >= 1000, it["speaker"]) for it in (evaluation[i] for i in range(4))} == {
        (False, "spk_a"), (False, "spk_b"), (True, "spk_a"), (True, "spk_b")}
    # Training reads one random sentence and speaker per entry, from the global numpy RNG.
    training = SpeechGroundingDataset(layout, "train", SIZE, train=True)
    assert len(training) == COUNTS["train"]
    seen = set()
    for seed in range(40):
        np.random.seed(seed)
        item = training[0]
        seen.add((item["sent_id"], item["speaker"]))
    assert len(seen) == 4
    only_b = SpeechGroundingDataset(layout, "val+testA", SIZE, speakers=["spk_b"])
    assert len(only_b) == COUNTS["val"] + COUNTS["test"] and {only_b[i]["speaker"] for i in range(3)} == {"spk_b"}
    with pytest.raises(FileNotFoundError, match="spk_c"):
        SpeechGroundingDataset(layout, "val", SIZE, speakers=["spk_c"])
    with pytest.raises(ValueError, match="no split 'testB'.*testA"):
        SpeechGroundingDataset(layout, "testB", SIZE)


def test_speakers_pick_one_voices_share_of_a_spoken_shapes_split(shapes, tmp_path):
    """One voice per sentence: choosing speakers leaves the others' sentences out, not broken; a
    file that no speaker has is still broken."""
    anns = _annotations(shapes)["test"]
    by_speaker = {}
    for entry in anns:
        by_speaker.setdefault(entry["refs"][0]["speaker"], []).append(entry["iid"])
    speaker, iids = sorted(by_speaker.items(), key=lambda kv: -len(kv[1]))[0]
    assert len(by_speaker) > 1, "the fixture needs test sentences in more than one voice"
    data = DataConfig(dataset="spoken_shapes", root=str(shapes), speakers=[speaker])
    dataset = build_srec_dataset(data, "test", SIZE, train=False)
    assert dataset.num_broken == 0
    assert sorted(dataset[i]["iid"] for i in range(len(dataset))) == sorted(iids)

    copy = tmp_path / "copy"
    shutil.copytree(shapes, copy)
    other = next(e for e in anns if e["refs"][0]["speaker"] != speaker)
    _wav_path(copy, other["refs"][0]).unlink()
    everyone = DataConfig(dataset="spoken_shapes", root=str(copy))
    with pytest.raises(BrokenEntryError, match=f"{other['refs'][0]['sent_id']}.wav"):
        build_srec_dataset(everyone, "test", SIZE, train=False)


@pytest.mark.parametrize("pattern", ["COCO_train2014_%012d.jpg", "{iid}.png", "img_{iid:06d}.jpg"])
def test_image_pattern_names_a_users_own_image_files(shapes, tmp_path, pattern):
    """A set whose images are named otherwise: same items as the generator's naming."""
    images = tmp_path / "photos"
    images.mkdir()
    anns = _annotations(shapes)
    for entry in anns["val"]:
        name = pattern.format(iid=entry["iid"]) if "{" in pattern else pattern % entry["iid"]
        shutil.copy(shapes / "images" / f"{entry['iid']:012d}.jpg", images / name)
    data = DataConfig(dataset="spoken_shapes", root=str(shapes), image_dir=str(images), image_pattern=pattern)
    renamed = build_srec_dataset(data, "val", SIZE, train=False)
    original = build_srec_dataset(DataConfig(dataset="spoken_shapes", root=str(shapes)), "val", SIZE, False)
    assert len(renamed) == len(original) == COUNTS["val"]
    for a, b in zip(renamed, original):
        assert Path(a["image_path"]).parent == images and torch.equal(a["image"], b["image"])
    # The pattern reaches the CSA pairs' layout too (they read no images, so nothing else changes).
    assert len(build_csa_dataset(data, "val", train=False)) == COUNTS["val"]


@pytest.mark.parametrize("pattern", ["scene.jpg", "{id}.png", "%d_%d.jpg", "{iid}/{iid}.png"])
def test_bad_image_pattern_says_how_to_write_one(shapes, pattern):
    data = DataConfig(dataset="spoken_shapes", root=str(shapes), image_pattern=pattern)
    with pytest.raises(ValueError, match=r"data\.image_pattern .* does not name one file per image id.*\{iid\}"):
        build_srec_dataset(data, "val", SIZE, train=False)


def test_face_set_reads_fbox_and_refcoco_audio(official):
    data = DataConfig(dataset="srefface", root=str(official))
    faces = build_srec_dataset(data, "testA", SIZE, train=False)
    boxes = build_srec_dataset(DataConfig(dataset="refcoco_speech", root=str(official)), "testA", SIZE, False)
    assert len(faces) == len(boxes) == COUNTS["test"] * 2
    for a, b in zip(faces, boxes):
        assert torch.equal(a["label"], b["label"]) and np.array_equal(a["waveform"], b["waveform"])


def test_csa_pairs_from_refs(official):
    pairs = build_csa_dataset(DataConfig(dataset="refcoco_speech", root=str(official), speakers=["spk_a"]), "train", False)
    assert len(pairs) == COUNTS["train"] * 2
    texts = sorted(pairs[i]["text"] for i in range(len(pairs)))
    assert texts.count("the same object again") == COUNTS["train"]
    batch = collate_csa([pairs[0], pairs[1]])
    assert batch["input_values"].shape[0] == 2 and batch["text"] == [pairs[0]["text"], pairs[1]["text"]]
    assert batch["utt_id"][0].startswith("spk_a/")
    training = build_csa_dataset(DataConfig(dataset="refcoco_speech", root=str(official)), "train", True)
    assert len(training) == COUNTS["train"] * 2  # one pair per sentence, speaker drawn per read


def _break(root: Path) -> dict[str, str]:
    """Breaks four train entries of the official copy in four ways; returns what each message names."""
    ann_file = root / "anns" / "general_object" / "refcoco_speech.json"
    anns = json.loads(ann_file.read_text())
    train = anns["train"]
    for speaker in ("spk_a", "spk_b"):
        (root / "audios" / "refcoco_speech" / speaker / f"{train[0]['sent_ids'][1]}.wav").unlink()
    (root / "audios" / "refcoco_speech" / "spk_b" / f"{train[1]['sent_ids'][0]}.wav").write_bytes(b"not a wav file")
    x, y, w, h = train[2]["bbox"]
    train[2]["bbox"] = [x + 700, y, w, h]
    (root / "images" / "train2014" / f"COCO_train2014_{train[3]['iid']:012d}.jpg").unlink()
    ann_file.write_text(json.dumps(anns))
    return {
        "missing audio": f"{train[0]['sent_ids'][1]}.wav",
        "unreadable audio": f"spk_b/{train[1]['sent_ids'][0]}.wav",
        "box outside": f"train[2] (iid {train[2]['iid']})",
        "missing image": f"COCO_train2014_{train[3]['iid']:012d}.jpg",
    }


def test_broken_entries_raise_or_are_skipped(official):
    named = _break(official)
    layout = refcoco_layout("refcoco_speech", official)
    with pytest.raises(BrokenEntryError) as err:
        SpeechGroundingDataset(layout, "train", SIZE)
    assert "train[0]" in str(err.value) and named["missing audio"] in str(err.value)
    kept = SpeechGroundingDataset(layout, "train", SIZE, train=True, skip_broken=True)
    assert kept.num_broken == 4 and len(kept) == COUNTS["train"] - 4
    for what, fragment in named.items():
        assert sum(fragment in message for message in kept.broken) == 1, what
    assert any("outside" in m for m in kept.broken) and any("unreadable audio" in m for m in kept.broken)
    item = kept[0]
    assert item["iid"] == json.loads(layout.ann_path.read_text())["train"][4]["iid"]


def test_empty_text_is_broken_for_csa(official):
    ann_file = official / "anns" / "general_object" / "refcoco_speech.json"
    anns = json.loads(ann_file.read_text())
    anns["val"][1]["refs"][0]["sent"] = "  "
    ann_file.write_text(json.dumps(anns))
    layout = refcoco_layout("refcoco_speech", official)
    with pytest.raises(BrokenEntryError, match=r"val\[1\].*no text"):
        SpeechTextPairs(layout.ann_path, layout.audio_root, "val")
    pairs = SpeechTextPairs(layout.ann_path, layout.audio_root, "val", skip_broken=True)
    assert pairs.num_broken == 1 and len(pairs) == (COUNTS["val"] - 1) * 2
    # SREC does not need the text.
    assert len(SpeechGroundingDataset(layout, "val", SIZE)) == COUNTS["val"] * 2


def test_missing_annotation_file_is_reported(tmp_path):
    (tmp_path / "audios" / "nothing" / "spk").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        build_srec_dataset(DataConfig(dataset="nothing", root=str(tmp_path)), "train", SIZE, False)


# --------------------------------------------------------------------------------------
# Hugging Face variant
# --------------------------------------------------------------------------------------
def _hf_rows(shapes: Path, split: str) -> dict[str, list]:
    rows = {"image": [], "bbox": [], "image_id": [], "sent_ids": [], "audios": []}
    for entry in _annotations(shapes)[split]:
        ref = entry["refs"][0]
        rows["image"].append({"bytes": (shapes / "images" / f"{entry['iid']:012d}.jpg").read_bytes(), "path": None})
        rows["bbox"].append(entry["bbox"])
        rows["image_id"].append(entry["iid"])
        rows["sent_ids"].append(entry["sent_ids"])
        rows["audios"].append([{"bytes": _wav_path(shapes, ref).read_bytes(), "path": None}])
    return rows


def _hf_dataset(rows: dict[str, list]):
    import datasets
    from datasets import Audio, Features, Image, List, Value

    # Built with the Audio column's storage type, then cast: encoding audio needs torchcodec.
    storage = {"bytes": Value("binary"), "path": Value("string")}
    features = Features({"image": Image(), "bbox": List(Value("float64")), "image_id": Value("int64"),
                         "sent_ids": List(Value("int64")), "audios": List(storage)})
    return datasets.Dataset.from_dict(rows, features=features).cast_column("audios", List(Audio(sampling_rate=SAMPLE_RATE)))


@pytest.fixture(scope="module")
def hf_dir(shapes, tmp_path_factory) -> Path:
    import datasets

    out = tmp_path_factory.mktemp("hf") / "refcoco-speech"
    datasets.DatasetDict({s: _hf_dataset(_hf_rows(shapes, s)) for s in ("train", "test")}).save_to_disk(str(out))
    return out


def test_hf_variant_matches_the_refcoco_layout(shapes, hf_dir):
    data = DataConfig(format="hf", dataset="refcoco_speech", root=str(hf_dir))
    hf = build_srec_dataset(data, "test", SIZE, train=False)
    local = build_srec_dataset(DataConfig(dataset="spoken_shapes", root=str(shapes)), "test", SIZE, False)
    assert len(hf) == len(local) == COUNTS["test"]
    for a, b in zip(hf, local):
        assert (a["iid"], a["sent_id"]) == (b["iid"], b["sent_id"])
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["gt_xyxy"], b["gt_xyxy"])
        np.testing.assert_array_equal(a["waveform"], b["waveform"])
        # PIL (reference HF path) and OpenCV decode the same JPEG to (nearly) the same pixels.
        assert (a["image"] - b["image"]).abs().mean() < 2 / 255
    batch = collate_srec([hf[0], hf[1]])
    assert batch["image"].shape == (2, 3, SIZE, SIZE)
    assert len(build_srec_dataset(data, "train+test", SIZE, train=True)) == COUNTS["train"] + COUNTS["test"]


def test_hf_variant_augments_training_items_from_its_own_audio(shapes, hf_dir):
    cfg = AugmentConfig(enabled=True)
    cfg.babble.prob, cfg.band_limit.prob = 1.0, 1.0
    data = DataConfig(format="hf", dataset="refcoco_speech", root=str(hf_dir))
    clean = SeededItems(build_srec_dataset(data, "train", SIZE, True))
    augmented_set = build_srec_dataset(data, "train", SIZE, True, augment=cfg)
    augmented = SeededItems(augmented_set)
    assert len(augmented_set.utterances) == COUNTS["train"]
    # Babble talkers are the split's own audio, read clean at 16 kHz.
    entry = _annotations(shapes)["train"][2]
    np.testing.assert_allclose(augmented_set._read_utterance(2),
                               load_audio(_wav_path(shapes, entry["refs"][0]))[0], atol=1e-6)
    key = (1, 77)
    assert not np.array_equal(clean[key]["waveform"], augmented[key]["waveform"])
    np.testing.assert_array_equal(augmented[key]["waveform"], augmented[key]["waveform"])
    test_set = build_srec_dataset(data, "test", SIZE, False, augment=cfg)
    assert test_set.augmenter is None


def test_hf_variant_from_parquet_snapshot_and_broken_rows(shapes, tmp_path):
    rows = _hf_rows(shapes, "train")
    x, y, w, h = rows["bbox"][2]
    rows["bbox"][2] = [x, y + 900, w, h]
    rows["audios"][4] = [{"bytes": b"garbage", "path": None}]
    (tmp_path / "snapshot" / "data").mkdir(parents=True)
    _hf_dataset(rows).to_parquet(str(tmp_path / "snapshot" / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(BrokenEntryError, match=f"row 2 \\(image_id {rows['image_id'][2]}\\).*outside"):
        HFSpeechGroundingDataset(tmp_path / "snapshot", "train", SIZE)
    kept = HFSpeechGroundingDataset(tmp_path / "snapshot", "train", SIZE, skip_broken=True)
    assert kept.num_broken == 2 and len(kept) == COUNTS["train"] - 2
    assert any("row 4" in m and "unreadable audio" in m for m in kept.broken)
    assert [kept[i]["iid"] for i in range(len(kept))] == [rows["image_id"][i] for i in (0, 1, 3, 5)]
    with pytest.raises(ValueError, match="no split 'val'"):
        HFSpeechGroundingDataset(tmp_path / "snapshot", "val", SIZE)
    with pytest.raises(ValueError, match=r"missing columns \['fbox'\]"):
        HFSpeechGroundingDataset(tmp_path / "snapshot", "train", SIZE, box_key="fbox")


# --------------------------------------------------------------------------------------
# LibriSpeech
# --------------------------------------------------------------------------------------
TRANSCRIPTS = {
    "dev-clean": {(84, 121123): ["PICK UP THE RED CIRCLE", "WHERE IS THE BIG BLUE STAR"]},
    "dev-other": {(116, 288045): ["GIVE ME THE SQUARE ON THE LEFT"]},
}


@pytest.fixture()
def librispeech(tmp_path) -> Path:
    root = tmp_path / "LibriSpeech"
    for subset, chapters in TRANSCRIPTS.items():
        for (speaker, chapter), texts in chapters.items():
            folder = root / subset / str(speaker) / str(chapter)
            folder.mkdir(parents=True)
            lines = []
            for i, text in enumerate(texts):
                utt_id = f"{speaker}-{chapter}-{i:04d}"
                speech = resample(espeak(text.lower(), "en-us", 160, 50), ESPEAK_SAMPLE_RATE)
                sf.write(folder / f"{utt_id}.flac", speech, SAMPLE_RATE, format="FLAC")
                lines.append(f"{utt_id} {text}")
            (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def test_librispeech_pairs(librispeech):
    data = DataConfig(format="librispeech", dataset="LibriSpeech", root=str(librispeech))
    val = build_csa_dataset(data, "val", train=False)  # dev-clean + dev-other
    assert len(val) == 3
    assert [val[i]["text"] for i in range(3)] == [*TRANSCRIPTS["dev-clean"][(84, 121123)],
                                                   *TRANSCRIPTS["dev-other"][(116, 288045)]]
    item = val[0]
    assert item["utt_id"] == "84-121123-0000" and item["waveform"].dtype == np.float32
    assert 0.5 * SAMPLE_RATE < len(item["waveform"]) < 4 * SAMPLE_RATE
    assert len(build_csa_dataset(data, "dev-other", train=True)) == 1
    capped = LibriSpeechDataset(librispeech, "dev-clean", max_duration=0.5)
    assert len(capped[0]["waveform"]) == 8000
    with pytest.raises(FileNotFoundError, match="train-clean-100"):
        build_csa_dataset(data, "train", train=True)


def test_librispeech_augmentation_keeps_the_duration_cap(librispeech):
    cfg = AugmentConfig(enabled=True)
    cfg.speed.prob, cfg.speed.factor, cfg.babble.prob = 1.0, [0.9, 0.9], 1.0  # always slower: longer
    data = DataConfig(format="librispeech", dataset="LibriSpeech", root=str(librispeech), max_duration=0.5)
    training = SeededItems(build_csa_dataset(data, "dev-clean", train=True, augment=cfg))
    clean = build_csa_dataset(data, "dev-clean", train=False, augment=cfg)
    assert clean.augmenter is None and len(clean[0]["waveform"]) == 8000
    wave = training[(0, 5)]["waveform"]
    assert len(wave) == 8000 and not np.array_equal(wave, clean[0]["waveform"])


def test_librispeech_broken_utterances(librispeech):
    folder = librispeech / "dev-clean" / "84" / "121123"
    (folder / "84-121123-0001.flac").unlink()
    transcript = folder / "84-121123.trans.txt"
    transcript.write_text(transcript.read_text() + "84-121123-0002 \n")
    with pytest.raises(BrokenEntryError, match=r"84-121123\.trans\.txt:2 .*84-121123-0001\.flac"):
        LibriSpeechDataset(librispeech, "dev-clean")
    kept = LibriSpeechDataset(librispeech, "dev-clean", skip_broken=True)
    assert len(kept) == 1 and kept.num_broken == 2
    assert any("empty transcript" in m for m in kept.broken)
