"""RefCLIP for speech: its loss, box-free training through the shared loop, evaluation by kind of
expression, pseudo-labels, and SREC trained on them. Real files, real (small) models."""

import json
import math
import shutil
from pathlib import Path

import cv2
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from csref_model.boxes import box_iou
from csref_model.checkpoint import save_checkpoint
from csref_model.config import load_model_config
from csref_model.csa import build_csa
from csref_model.detector import build_detector
from csref_model.grounder import Grounder
from csref_model.refclip import RefCLIP, RefCLIPConfig, anchor_contrastive_loss, box_geometry
from csref_model.srec import build_srec
from csref_model.typed_yaml import merge
from csref_training import import_pairs, refclip, srec
from csref_training.checkpointing import TRAINER_STATE
from csref_training.spoken_shapes.generate import SynthConfig, generate_dataset
from csref_training.train_config import build_model_config, load_train_config
from training_support import TEST_MODEL, tiny_detector_config

SPLITS = {"train": 8, "val": 4, "test": 4}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small Spoken Shapes set, a (random) CSA checkpoint and a (random) detector checkpoint:
    RefCLIP's machinery, not its accuracy, is under test here."""
    root = tmp_path_factory.mktemp("refclip")
    generate_dataset(SynthConfig(out=root / "data", seed=3, voices=("en-us+m3", "en-gb+f2")), SPLITS)
    csa_config = load_model_config("tiny")
    csa_config = type(csa_config).from_dict(merge(csa_config.to_dict(), {"speech_encoder": TEST_MODEL["speech_encoder"]}))
    save_checkpoint(root / "csa", build_csa(csa_config), csa_config)
    detector_config = tiny_detector_config()
    save_checkpoint(root / "detector", build_detector(detector_config), detector_config)
    return {"root": root, "data": root / "data", "csa": root / "csa", "detector": root / "detector"}


def overrides(setup: dict[str, Path], output_dir: Path, *extra: str) -> list[str]:
    return [f"data.root={setup['data']}", f"output_dir={output_dir}", f"task.detector_checkpoint={setup['detector']}",
            f"task.speech_checkpoint={setup['csa']}", "data.num_workers=0", "batch_size=4", "eval_batch_size=4",
            "model_overrides.select_num=8", "model_overrides.fusion_channels=32", "model_overrides.hidden_size=16",
            *extra]


def train(setup: dict[str, Path], output_dir: Path, *extra: str) -> dict:
    return refclip.main(["--config", "config/train/refclip_spoken_shapes.yaml", *overrides(setup, output_dir, *extra)])


def test_loss_uses_best_anchors_and_other_images_second_best():
    # Expression b, image a, candidate k. Expression 0's logits: best of image 0 (3.0), best of
    # image 1 (1.0), second-best of image 1 (0.5); its own image's second best (2.0) is not a negative.
    scores = torch.tensor([[[3.0, 2.0, -1.0], [1.0, 0.5, 0.0]],
                           [[0.2, 0.1, 0.0], [4.0, -2.0, 1.5]]])  # (2 expressions, 2 images, 3)
    expected_0 = -math.log(math.exp(3.0) / (math.exp(3.0) + math.exp(1.0) + math.exp(0.5)))
    # Expression 1: best of image 0 (0.2), best of image 1 (4.0, the target), second of image 0 (0.1).
    expected_1 = -math.log(math.exp(4.0) / (math.exp(0.2) + math.exp(4.0) + math.exp(0.1)))
    torch.testing.assert_close(anchor_contrastive_loss(scores), torch.tensor((expected_0 + expected_1) / 2))


def test_box_geometry_is_centre_size_and_distance_from_the_middle():
    boxes = torch.tensor([[0.0, 32.0, 64.0, 64.0], [96.0, 112.0, 128.0, 128.0]])  # letterboxed px, S = 128
    expected = torch.tensor([[0.25, 0.375, 0.5, 0.25, 0.25, 0.125], [0.875, 0.9375, 0.25, 0.125, 0.375, 0.4375]])
    torch.testing.assert_close(box_geometry(boxes, 128), expected)


def test_the_returned_score_is_the_margin_over_the_best_other_object():
    detector_config = tiny_detector_config()
    speech = merge(load_model_config("tiny").to_dict()["speech_encoder"], TEST_MODEL["speech_encoder"])
    model = RefCLIP(RefCLIPConfig.from_dict({"detector": detector_config.to_dict(), "speech_encoder": speech,
                                             "fusion_channels": 32, "hidden_size": 16, "select_num": 8})).eval()
    torch.manual_seed(0)
    image, audio = torch.rand(3, 3, 128, 128), torch.randn(3, 8000)
    with torch.no_grad():
        boxes, scores = model.score_candidates(image, audio)  # (B, K, 5), (B, K)
        chosen = model(image, audio)  # (B, 5)
    for b in range(3):
        best = int(scores[b].argmax())
        assert torch.equal(chosen[b, :4], boxes[b, best, :4])
        rivals = [float(scores[b, k]) for k in range(scores.shape[1])
                  if float(box_iou(boxes[b, best, :4], boxes[b, k, :4])) < 0.5]
        rival = max(rivals) if rivals else float(scores[b].min())
        assert float(chosen[b, 4]) == pytest.approx(float(scores[b, best]) - rival, abs=1e-5)
        assert float(chosen[b, 4]) >= 0.0


@pytest.mark.parametrize("geometry", [False, True], ids=["as_published", "candidate_geometry"])
def test_training_never_reads_a_box(setup, tmp_path, geometry):
    # The candidates' own boxes (the detector's) may shape their embeddings; the referent's box never.
    geometry_override = f"model_overrides.candidate_geometry={str(geometry).lower()}"
    first = train(setup, tmp_path / "a", "epochs=1", "data.val_split=val", geometry_override)
    # The same run on annotations whose training boxes are all wrong gives the same weights.
    annotations = json.loads((setup["data"] / "anns" / "spoken_shapes.json").read_text())
    for entry in annotations["train"]:
        entry["bbox"] = [1.0, 1.0, 5.0, 5.0]
        del entry["objects"], entry["target_index"]
    scrambled = tmp_path / "scrambled.json"
    scrambled.write_text(json.dumps(annotations))
    second = train(setup, tmp_path / "b", "epochs=1", geometry_override, f"data.ann_path={scrambled}",
                   f"data.image_dir={setup['data'] / 'images'}", f"data.audio_root={setup['data'] / 'audios' / 'spoken_shapes'}")
    assert first["global_step"] == second["global_step"] == 2
    weights_a = load_file(tmp_path / "a" / "last" / "model.safetensors")
    weights_b = load_file(tmp_path / "b" / "last" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a)
    # ... and training moved the trainable parts: the raw weights left the EMA (~ initial) ones.
    raw = torch.load(tmp_path / "a" / "last" / TRAINER_STATE, weights_only=True)["raw_model"]
    assert not torch.equal(raw["linear_ts.weight"], weights_a["linear_ts.weight"])
    assert ("linear_geometry.weight" in raw) == geometry
    if geometry:
        assert not torch.equal(raw["linear_geometry.weight"], weights_a["linear_geometry.weight"])
    assert torch.equal(raw["detector.head.obj_preds.0.weight"], weights_a["detector.head.obj_preds.0.weight"])


def test_supervised_upper_bound_reads_the_boxes_and_is_refused_without_them(setup, tmp_path):
    """task.loss=supervised_upper_bound (a diagnostic, not weak supervision) learns from the referent
    boxes: scrambling them changes the weights, unlike RefCLIP's own loss."""
    annotations = json.loads((setup["data"] / "anns" / "spoken_shapes.json").read_text())
    for entry in annotations["train"]:
        entry["bbox"] = [1.0, 1.0, 5.0, 5.0]
    scrambled = tmp_path / "scrambled.json"
    scrambled.write_text(json.dumps(annotations))
    bound = ("task.loss=supervised_upper_bound", "epochs=1", "ema.enabled=false")
    train(setup, tmp_path / "a", *bound)
    train(setup, tmp_path / "b", *bound, f"data.ann_path={scrambled}", f"data.image_dir={setup['data'] / 'images'}",
          f"data.audio_root={setup['data'] / 'audios' / 'spoken_shapes'}")
    weights_a = load_file(tmp_path / "a" / "last" / "model.safetensors")
    weights_b = load_file(tmp_path / "b" / "last" / "model.safetensors")
    assert not torch.equal(weights_a["linear_ts.weight"], weights_b["linear_ts.weight"])
    with pytest.raises(ValueError, match="data.boxes=false has none"):
        train(setup, tmp_path / "c", *bound, "data.boxes=false", "task.select_best_by=val_loss")
    with pytest.raises(ValueError, match="task.loss must be"):
        train(setup, tmp_path / "d", "task.loss=boxes")


def test_evaluate_reports_chance_and_kinds_then_pseudo_labels_train_srec(setup, tmp_path, capsys):
    train(setup, tmp_path / "run", "max_steps=2")
    checkpoint = tmp_path / "run" / "last"
    config = "config/train/refclip_spoken_shapes.yaml"
    base = overrides(setup, tmp_path / "run")
    result = refclip.main(["evaluate", "--config", config, "--checkpoint", str(checkpoint), "--split", "test", *base])
    assert result["count"] == SPLITS["test"]
    annotations = json.loads((setup["data"] / "anns" / "spoken_shapes.json").read_text())
    expected_chance = sum(1 / len(e["objects"]) for e in annotations["test"]) / SPLITS["test"]
    assert result["chance_acc_50"] == pytest.approx(expected_chance)
    assert sum(kind["count"] for kind in result["acc_50_by_kind"].values()) == SPLITS["test"]
    # The shape-and-colour oracle: exact on those words; a size or place word is said only
    # when another object of that shape (and colour) is there, and it stays a guess between them.
    assert expected_chance <= result["shape_colour_oracle_acc_50"] <= 1.0
    for kind, row in result["acc_50_by_kind"].items():
        if "size" in kind or "place" in kind:
            assert row["shape_colour_oracle"] <= 0.5, kind
        else:
            assert row["shape_colour_oracle"] == 1.0, kind

    report = refclip.main(["pseudo-label", "--config", config, "--checkpoint", str(checkpoint),
                           "--out", str(tmp_path / "pseudo"), *base])
    pseudo = json.loads(Path(report["ann_path"]).read_text())
    for split in ("train", "val"):
        # An untrained model may put a box wholly outside the image: such a label is dropped, counted.
        assert len(pseudo[split]) + report[split]["outside_the_image"] == SPLITS[split]
    assert pseudo["test"] == annotations["test"]  # evaluation split untouched
    for entry in pseudo["train"] + pseudo["val"]:
        assert entry["pseudo"] is True and isinstance(entry["pseudo_score"], float)
        assert "objects" not in entry and "target_index" not in entry
    assert 0.0 <= report["train"]["pseudo_label_acc_50"] <= 1.0
    # --keep-fraction keeps each split's surest labels, in their order, and reports what it dropped.
    half = refclip.main(["pseudo-label", "--config", config, "--checkpoint", str(checkpoint),
                         "--out", str(tmp_path / "pseudo_half"), "--keep-fraction", "0.5", *base])
    pseudo_half = json.loads(Path(half["ann_path"]).read_text())
    for split in ("train", "val"):
        assert len(pseudo_half[split]) == math.ceil(len(pseudo[split]) / 2)
        assert half[split]["dropped_as_least_confident"] == len(pseudo[split]) - len(pseudo_half[split])
        assert half[split]["pseudo_label_acc_50_before_dropping"] == report[split]["pseudo_label_acc_50"]
        kept_ids = [e["sent_ids"][0] for e in pseudo_half[split]]
        assert kept_ids == [e["sent_ids"][0] for e in pseudo[split] if e["sent_ids"][0] in kept_ids]
        dropped = [e["pseudo_score"] for e in pseudo[split] if e["sent_ids"][0] not in kept_ids]
        assert min(e["pseudo_score"] for e in pseudo_half[split]) >= max(dropped, default=float("-inf"))
    assert pseudo_half["test"] == annotations["test"]
    with pytest.raises(SystemExit):
        refclip.main(["pseudo-label", "--config", config, "--checkpoint", str(checkpoint),
                      "--out", str(tmp_path / "pseudo_none"), "--keep-fraction", "0", *base])
    err = capsys.readouterr().err
    assert "--keep-fraction 0.0: must be in (0, 1]" in err
    # The existing SREC trainer takes the copy as it is.
    srec_result = srec.main(["--config", "config/train/srec_spoken_shapes.yaml", "model=tiny",
                             f"output_dir={tmp_path / 'srec'}", f"data.ann_path={report['ann_path']}",
                             f"data.image_dir={setup['data'] / 'images'}",
                             f"data.audio_root={setup['data'] / 'audios' / 'spoken_shapes'}",
                             "data.num_workers=0", "batch_size=4", "eval_batch_size=4", "max_steps=1",
                             "init_speech_encoder=null", "multi_scale.enabled=false"])
    assert srec_result["global_step"] == 1


def test_missing_checkpoints_are_named(setup, tmp_path):
    with pytest.raises(ValueError, match="task.detector_checkpoint is required"):
        refclip.main(["--config", "config/train/refclip_spoken_shapes.yaml", "task.detector_checkpoint=",
                      f"output_dir={tmp_path}"])


def test_robot_folder_to_fine_tuned_node_model_without_boxes(setup, tmp_path):
    """docs/TRAINING.md "Fine-tuning without boxes": pairs folder -> box-free dataset -> RefCLIP
    selected by validation loss -> pseudo-labels -> SREC fine-tuned from a node model -> Grounder."""
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    annotations = json.loads((setup["data"] / "anns" / "spoken_shapes.json").read_text())
    entries = annotations["train"][:6]
    for index, entry in enumerate(entries):
        ref = entry["refs"][0]
        image = cv2.imread(str(setup["data"] / "images" / f"{entry['iid']:012d}.jpg"))
        # One frame as PNG: the importer re-encodes it.
        cv2.imwrite(str(pairs / f"frame_{index:02d}.{'png' if index == 0 else 'jpg'}"), image)
        shutil.copyfile(setup["data"] / "audios" / "spoken_shapes" / ref["speaker"] / f"{ref['sent_id']}.wav",
                        pairs / f"frame_{index:02d}.wav")
    (pairs / "frame_99.wav").write_bytes((pairs / "frame_00.wav").read_bytes())  # no image: left out
    imported = import_pairs.main(["--pairs", str(pairs), "--out", str(tmp_path / "robot"), "--val-fraction", "0.3"])
    assert (imported["pairs"], imported["train"], imported["val"]) == (6, 4, 2)

    data = [f"data.root={tmp_path / 'robot'}", "data.dataset=my_robot", "data.boxes=false"]
    with pytest.raises(ValueError, match="task.select_best_by=val_loss"):
        train(setup, tmp_path / "refclip", *data)
    result = train(setup, tmp_path / "refclip", *data, "task.select_best_by=val_loss", "max_steps=2")
    assert result["best_val_loss"] > 0
    base = overrides(setup, tmp_path / "refclip") + data
    report = refclip.main(["pseudo-label", "--config", "config/train/refclip_spoken_shapes.yaml", "--checkpoint",
                           str(tmp_path / "refclip" / "best"), "--out", str(tmp_path / "pseudo"), *base])
    assert report["train"]["pseudo_label_acc_50"] is None  # no truth exists for these pairs

    srec_args = ["model=tiny", "data.dataset=my_robot", f"data.ann_path={report['ann_path']}",
                 f"data.image_dir={tmp_path / 'robot' / 'images'}",
                 f"data.audio_root={tmp_path / 'robot' / 'audios' / 'my_robot'}", "data.num_workers=0",
                 "batch_size=2", "eval_batch_size=2", "max_steps=1", "init_speech_encoder=null",
                 "multi_scale.enabled=false", f"output_dir={tmp_path / 'srec'}"]
    srec_config = "config/train/srec_spoken_shapes.yaml"
    node_model_config = build_model_config(load_train_config(srec_config, srec_args))
    save_checkpoint(tmp_path / "node_model", build_srec(node_model_config), node_model_config)
    srec.main(["--config", srec_config, *srec_args, f"init_checkpoint={tmp_path / 'node_model'}"])
    grounder = Grounder.from_checkpoint(tmp_path / "srec" / "last")
    wave, _ = sf.read(pairs / "frame_01.wav", dtype="float32")
    result = grounder.ground(cv2.cvtColor(cv2.imread(str(pairs / "frame_01.jpg")), cv2.COLOR_BGR2RGB), wave)
    assert result.box_xyxy.shape == (4,) and 0.0 <= result.score <= 1.0
