"""S+S+C referring masks: GrabCut segments, greedy matching and random assignment under the
referent constraints, the class-weighted cross-entropy, the metrics, the generator's masks and
referents, the stages end to end with tiny real models, and mask-less checkpoints."""

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from csref_model.checkpoint import save_checkpoint
from csref_model.config import ModelConfig, load_model_config
from csref_model.detector import build_detector
from csref_model.mask_head import mask_to_original
from csref_model.preprocessing import letterbox_geometry
from csref_model.refclip import RefCLIP, RefCLIPConfig
from csref_model.srec import build_srec, build_srec_from_checkpoint
from csref_model.typed_yaml import merge
from csref_training import ssc
from csref_training.referring_masks import (
    class_weighted_ce,
    grabcut_box,
    greedy_assignment,
    letterbox_labels,
    mask_counts,
    random_assignment,
    read_label_png,
    summarise,
)
from csref_training.spoken_shapes.generate import SynthConfig, generate_dataset
from csref_training.spoken_shapes.grammar import SceneObject
from csref_training.spoken_shapes.render import draw_object, object_label_map
from training_support import TEST_MODEL, tiny_detector_config

SPLITS = {"train": 4, "val": 2, "test": 2}


def test_grabcut_segments_a_drawn_shape():
    rng = np.random.default_rng(0)
    canvas = np.full((160, 200, 3), (40, 90, 60), dtype=np.uint8)
    canvas = np.clip(canvas.astype(int) + rng.integers(-10, 11, canvas.shape), 0, 255).astype(np.uint8)
    star = SceneObject("star", "yellow", "big", (60.0, 30.0, 150.0, 120.0))
    draw_object(canvas, star, np.array([230.0, 210.0, 40.0]))
    truth = object_label_map(160, 200, [star]) == 1
    predicted = grabcut_box(canvas, (56, 26, 154, 124))  # a detector's box, a little loose
    inter, union = mask_counts(predicted, truth)
    assert inter / union > 0.8
    assert np.array_equal(predicted, grabcut_box(canvas, (56, 26, 154, 124)))  # repeatable


def test_greedy_matching_keeps_referents_apart_and_together():
    # Image "a": sentences 0 and 1 describe referent 10, sentence 2 referent 11; image "b": one
    # sentence. Sentence 1 prefers mask 0 most of all (0.9), so referent 10 takes mask 0 for both
    # its sentences, although sentence 0 prefers mask 1; referent 11 also prefers mask 0 but must
    # take another: its next best, mask 2.
    preferences = [torch.tensor([0.3, 0.8, 0.1]), torch.tensor([0.9, 0.2, 0.0]), torch.tensor([0.85, 0.1, 0.4]),
                   torch.tensor([0.1, 0.7])]
    chosen = greedy_assignment(preferences, referents=[10, 10, 11, 12], images=["a", "a", "a", "b"])
    assert chosen == [0, 0, 2, 1]
    # More referents than masks: the one left over gets none (S+S+C adds no loss for it) ...
    chosen = greedy_assignment([torch.tensor([0.9, 0.2]), torch.tensor([0.5, 0.1]), torch.tensor([0.3, 0.8])],
                               referents=[1, 2, 3], images=["a", "a", "a"])
    assert chosen == [0, None, 1]
    # ... but a sample with a single candidate always gets it.
    assert greedy_assignment([torch.tensor([0.9]), torch.tensor([0.5])], referents=[1, 2], images=["a", "a"]) == [0, 0]


def test_random_assignment_respects_the_constraints():
    for seed in range(20):
        chosen = random_assignment([3, 3, 3, 2], referents=[1, 1, 2, 3], images=["a", "a", "a", "b"],
                                   rng=np.random.default_rng(seed))
        assert chosen[0] == chosen[1] and chosen[2] != chosen[0]
        assert 0 <= chosen[3] < 2


def test_class_weighted_cross_entropy_value():
    # One sample of two pixels: a target pixel with p(target) = e/(1+e), a background one with
    # p(background) = 1/2. Weighted mean: (1.1 * -log p_t + 0.9 * -log p_b) / (1.1 + 0.9).
    logits = torch.tensor([[[[0.0, 0.0]], [[1.0, 0.0]]]])  # (1, 2, 1, 2)
    targets = torch.tensor([[[1, 0]]])  # (1, 1, 2)
    expected = (1.1 * -math.log(math.e / (1 + math.e)) + 0.9 * math.log(2)) / 2.0
    assert class_weighted_ce(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    # A sample left out (greedy_ce without a mask for it) adds nothing but still counts.
    pair = class_weighted_ce(logits.repeat(2, 1, 1, 1), targets.repeat(2, 1, 1), torch.tensor([True, False]))
    assert pair.item() == pytest.approx(expected / 2, rel=1e-6)


@pytest.mark.parametrize("height, width", [(300, 460), (480, 320)])
def test_masks_round_trip_through_the_letterbox_and_stride_4(height, width):
    # A true mask, letterboxed as training targets are, pooled to the stride-4 grid as two-class
    # logits and mapped back as evaluation does, must land on itself: any offset, flip or
    # scale error of the letterbox geometry shows as a low IoU.
    star = SceneObject("star", "yellow", "big", (0.3 * width, 0.2 * height, 0.7 * width, 0.65 * height))
    truth = object_label_map(height, width, [star]) == 1
    geometry = letterbox_geometry(height, width, 256)
    target = letterbox_labels(truth.astype(np.uint8), geometry).astype(np.float32)  # (256, 256)
    assert target.sum() > 0 and target[:geometry.dy].sum() == 0  # nothing in the padding
    coarse = torch.nn.functional.avg_pool2d(torch.from_numpy(target)[None, None], 4)[0, 0]  # (64, 64)
    logits = torch.stack([0.5 - coarse, coarse - 0.5])  # (2, 64, 64): target where most of a cell is
    inter, union = mask_counts(mask_to_original(logits, geometry), truth)
    assert inter / union > 0.9


def test_miou_and_oiou_differ():
    # A small object missed (IoU 0) and a big one found exactly (IoU 1): mIoU = 0.5, while the
    # pixel-pooled oIoU is dominated by the big one: 100 / (100 + 4).
    metrics = summarise(intersections=[0, 100], unions=[4, 100], box_hits=[False, True])
    assert metrics["miou"] == pytest.approx(0.5)
    assert metrics["oiou"] == pytest.approx(100 / 104)
    assert metrics["prec@0.5"] == metrics["prec@0.9"] == pytest.approx(0.5)
    assert metrics["box_acc_50"] == pytest.approx(0.5)


def test_checkpoint_without_mask_head_loads_and_runs(tmp_path):
    config = ModelConfig.from_dict(merge(load_model_config("tiny").to_dict(), TEST_MODEL))
    save_checkpoint(tmp_path / "boxes_only", build_srec(config, load_pretrained=False), config)
    stored = yaml.safe_load((tmp_path / "boxes_only" / "config.yaml").read_text())
    del stored["mask_head"]  # as written before mask heads existed
    (tmp_path / "boxes_only" / "config.yaml").write_text(yaml.safe_dump(stored))
    model, loaded = build_srec_from_checkpoint(tmp_path / "boxes_only")
    assert model.mask_head is None and not loaded.mask_head.enabled
    assert not any(key.startswith("mask_head") for key in model.state_dict())
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64), torch.randn(1, 8000)).shape == (1, 5)
    with pytest.raises(RuntimeError, match="no mask head"):
        model.segment(torch.rand(1, 3, 64, 64), torch.randn(1, 8000))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Spoken Shapes with masks and 3 referents per scene, a (random) detector and RefCLIP:
    the stages' machinery, not their accuracy, is under test."""
    root = tmp_path_factory.mktemp("ssc")
    generate_dataset(SynthConfig(out=root / "data", seed=5, voices=("en-us+m3",), masks=True, referents_per_scene=3),
                     SPLITS)
    detector_config = tiny_detector_config()
    save_checkpoint(root / "detector", build_detector(detector_config), detector_config)
    speech = merge(load_model_config("tiny").to_dict()["speech_encoder"], TEST_MODEL["speech_encoder"])
    refclip_config = RefCLIPConfig.from_dict({"detector": detector_config.to_dict(), "speech_encoder": speech,
                                              "fusion_channels": 32, "hidden_size": 16, "select_num": 8})
    save_checkpoint(root / "refclip", RefCLIP(refclip_config), refclip_config)
    return {"root": root, "data": root / "data", "detector": root / "detector", "refclip": root / "refclip"}


def overrides(setup: dict[str, Path], *extra: str) -> list[str]:
    return [f"data.root={setup['data']}", f"task.stage_dir={setup['root'] / 'stages'}",
            f"task.detector_checkpoint={setup['detector']}", f"task.refclip_checkpoint={setup['refclip']}",
            "task.min_objectness=0.0", "task.candidates=6", "data.num_workers=0", "eval_batch_size=4", *extra]


def test_generator_writes_masks_and_several_referents(setup):
    annotations = json.loads((setup["data"] / "anns" / "spoken_shapes.json").read_text())
    assert "mask_file" not in annotations["train"][0]
    for split in ("val", "test"):
        by_image: dict[int, list[dict]] = {}
        for entry in annotations[split]:
            by_image.setdefault(entry["iid"], []).append(entry)
        assert all(len(entries) >= 2 for entries in by_image.values())
        for entries in by_image.values():
            assert len({e["target_index"] for e in entries}) == len(entries)  # different referents
            labels = read_label_png(setup["data"] / entries[0]["mask_file"])
            for entry in entries:
                ys, xs = np.nonzero(labels == entry["target_index"] + 1)
                x, y, w, h = entry["bbox"]
                assert abs(xs.min() - x) <= 1 and abs(xs.max() + 1 - (x + w)) <= 1
                assert abs(ys.min() - y) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1


def test_truth_select_scores_one_and_needs_masks(setup, tmp_path):
    # The true masks written as "selected" masks evaluate to 1 on every metric: the evaluation
    # and the mask files agree pixel for pixel. Train entries without masks are refused clearly.
    config = "config/train/ssc_spoken_shapes.yaml"
    stage = [f"task.stage_dir={tmp_path / 'stages'}"]
    ssc.main(["select", "--config", config, "--split", "val", "--method", "truth", *overrides(setup, *stage)])
    metrics = ssc.main(["evaluate", "--config", config, "--split", "val", "--select", "truth", *overrides(setup, *stage)])
    assert metrics["miou"] == metrics["oiou"] == metrics["prec@0.9"] == metrics["box_acc_50"] == 1.0
    with pytest.raises(ValueError, match="--train-masks"):
        ssc.main(["select", "--config", config, "--split", "train", "--method", "truth", *overrides(setup, *stage)])
    with pytest.raises(ValueError, match="train_masks needs masks"):
        generate_dataset(SynthConfig(out=tmp_path / "data", train_masks=True), {"train": 1})


def test_stages_end_to_end(setup, tmp_path):
    config = "config/train/ssc_spoken_shapes.yaml"
    stages = setup["root"] / "stages"
    for split in ("train", "val"):
        report = ssc.main(["segment", "--config", config, "--split", split, *overrides(setup)])
        assert report["referents"] > 0
    labels = read_label_png(next((stages / "segment" / "train").glob("instances_*.png")))
    assert labels.max() >= 1
    for method in ("refclip", "first", "random", "best"):
        ssc.main(["select", "--config", config, "--split", "train", "--method", method, *overrides(setup)])
    ssc.main(["select", "--config", config, "--split", "val", "--method", "best", *overrides(setup)])
    oracle = ssc.main(["evaluate", "--config", config, "--split", "val", "--select", "best", *overrides(setup)])
    assert 0.0 <= oracle["miou"] <= 1.0 and oracle["count"] > 0

    train = ["init_checkpoint=null", f"model_overrides={json.dumps(TEST_MODEL)}", "batch_size=2", "max_steps=2",
             "epochs=1", "ema.enabled=false", "data.val_split=val"]
    # A fresh trunk: the backbone from the detector (same CSPDarknet size), the rest random.
    ssc.main(["correct", "--config", config, *overrides(setup, f"output_dir={tmp_path / 'random'}", *train,
                                                        f"task.visual_encoder_checkpoint={setup['detector']}")])
    ssc.main(["correct", "--config", config, *overrides(setup, f"output_dir={tmp_path / 'greedy'}", "task.loss=greedy_ce",
                                                        *train[1:], f"init_checkpoint={tmp_path / 'random' / 'last'}")])
    model, model_config = build_srec_from_checkpoint(tmp_path / "greedy" / "last")
    assert model_config.mask_head.enabled and model.mask_head is not None
    metrics = ssc.main(["evaluate", "--config", config, "--split", "val", "--checkpoint", str(tmp_path / "greedy" / "last"),
                        *overrides(setup)])
    assert set(metrics) >= {"miou", "oiou", "prec@0.5", "prec@0.7", "prec@0.9", "box_acc_50"}
    stored = cv2.imread(str(next((stages / "select" / "refclip" / "train").glob("mask_*.png"))), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(stored)) <= {0, 1}
