"""The class-agnostic candidate detector: multi-box training through the shared loop, checkpoints that
describe themselves, candidate recall, and clear errors for configs that are not a detector's."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from csref_model.config import load_model_config
from csref_model.detector import (
    DetectorConfig,
    ObjectDetector,
    build_detector_from_checkpoint,
    load_detector_config,
    patches_in_boxes,
    top_cells,
)
from csref_training import detector as detector_trainer
from csref_training.datasets import SceneObjectsDataset, refcoco_layout
from csref_training.spoken_shapes.generate import SynthConfig, generate_dataset

IMAGES = 8


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("detector_scenes")
    generate_dataset(SynthConfig(out=root, seed=1000, backgrounds=("plain",)), {"train": IMAGES, "val": IMAGES, "test": 0})
    return root


def train(scenes: Path, output_dir: Path, *overrides: str) -> dict:
    # Validated on the very scenes it trains on: these tests check that it learns, not how it generalises.
    return detector_trainer.main(["--config", "config/train/detector_spoken_shapes.yaml", f"data.root={scenes}",
                                  f"output_dir={output_dir}", "data.num_workers=0", "batch_size=4",
                                  "eval_batch_size=8", "data.val_split=train", *overrides])


def test_dataset_gives_every_object_box_in_input_pixels(scenes):
    dataset = SceneObjectsDataset(refcoco_layout("spoken_shapes", scenes), "train", image_size=256)
    assert len(dataset) == IMAGES
    item = dataset[0]
    assert item["image"].shape == (3, 256, 256)
    assert 3 <= item["boxes"].shape[0] <= 6 and item["boxes"].shape == (len(item["gt_xyxy"]), 4)
    # Centres map back to the original boxes through the letterbox.
    geometry = item["letterbox"]
    cx, cy = item["boxes"][:, 0].numpy(), item["boxes"][:, 1].numpy()
    x1, y1, x2, y2 = item["gt_xyxy"].T
    assert abs(cx - ((x1 + x2) / 2 * geometry.nw / geometry.w + geometry.dx)).max() < 0.5
    assert abs(cy - ((y1 + y2) / 2 * geometry.nh / geometry.h + geometry.dy)).max() < 0.5


def test_detector_learns_candidates_and_reloads_from_its_checkpoint(scenes, tmp_path):
    result = train(scenes, tmp_path / "run", "epochs=40", "optim.warmup_epochs=1", "optim.lr=3e-3", "ema.enabled=false")
    # 80 steps on 8 scenes: an untrained detector covers no object (recall 0.0 at the first
    # validation); this one covers close to half of them (0.47 measured).
    assert result["best_recall_50"] >= 0.3
    model, config = build_detector_from_checkpoint(tmp_path / "run" / "best")
    assert config == load_detector_config("detector_tiny")
    dataset = SceneObjectsDataset(refcoco_layout("spoken_shapes", scenes), "train", image_size=config.image_size)
    cells = model(dataset[0]["image"][None])
    assert cells.shape == (1, (config.image_size // 32) ** 2, 5)
    top, indices = top_cells(cells, 17)
    assert torch.equal(top[0, :, 4], cells[0, indices[0], 4]) and bool((top[0, :-1, 4] >= top[0, 1:, 4]).all())
    # Fine-tuned at a larger input from that checkpoint, with a learning rate too small to move it: its
    # weights stay the checkpoint's (BatchNorm statistics do move in training mode), and it finds
    # candidates at the first validation (an untrained detector: recall 0.0). It may also add the
    # appearance head, which the checkpoint does not have.
    larger = train(scenes, tmp_path / "larger", "epochs=1", "optim.lr=1e-12", "ema.enabled=false",
                   f"init_checkpoint={tmp_path / 'run' / 'best'}", "model_overrides.image_size=320",
                   "model_overrides.appearance_loss_weight=10")
    assert larger["best_recall_50"] > 0.0
    start, fine_tuned = (load_file(tmp_path / run / "best" / "model.safetensors") for run in ("run", "larger"))
    assert set(fine_tuned) - set(start) == {"appearance_head.weight", "appearance_head.bias"}
    for name, weight in start.items():
        if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(fine_tuned[name], weight, rtol=0, atol=1e-6, msg=name)
    larger_model, larger_config = build_detector_from_checkpoint(tmp_path / "larger" / "best")
    assert larger_config.image_size == 320 and larger_model.appearance_head is not None
    # The evaluate command gives the same recall at the checkpoint's size, and measures it at any other.
    # Overrides may come between the options.
    evaluate = ["evaluate", "--config", "config/train/detector_spoken_shapes.yaml", f"data.root={scenes}", "--checkpoint",
                str(tmp_path / "larger" / "best"), "--split", "train", "data.num_workers=0"]
    evaluated = detector_trainer.main(evaluate)
    assert evaluated["image_size"] == 320 and evaluated["recall_50"] == pytest.approx(larger["best_recall_50"])
    assert detector_trainer.main([*evaluate, "--image-size", "256"])["image_size"] == 256
    with pytest.raises(SystemExit, match="multiple of 32"):
        detector_trainer.main([*evaluate, "--image-size", "300"])


def test_appearance_loss_teaches_the_stride_32_map_the_colours_of_the_objects(scenes):
    torch.manual_seed(0)
    config = dataclasses.replace(load_detector_config("detector_tiny"), appearance_loss_weight=1.0)
    model = ObjectDetector(config)
    dataset = SceneObjectsDataset(refcoco_layout("spoken_shapes", scenes), "train", image_size=config.image_size)
    image = torch.stack([dataset[index]["image"] for index in range(4)])  # (4, 3, S, S)
    boxes = [dataset[index]["boxes"] for index in range(4)]
    patches = torch.nn.functional.avg_pool2d(image, 8)  # (4, 3, S/8, S/8)
    centres = torch.arange(patches.shape[-1]) * 8.0 + 4.0
    in_object = torch.stack([patches_in_boxes(centres, b) for b in boxes]).bool()  # (4, S/8, S/8)
    assert 0.05 < in_object.float().mean() < 0.6
    # The best prediction that knows neither the object nor its place: one colour for every object patch.
    object_colours = patches.permute(0, 2, 3, 1)[in_object]  # (N, 3)
    constant_error = (object_colours - object_colours.mean(dim=0)).pow(2).mean()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(120):
        optimizer.zero_grad()
        loss = model.appearance_loss(image, model.encode_image(image)[-1], boxes)
        loss.backward()
        optimizer.step()
    with torch.no_grad():  # still in training mode: 120 steps leave the BatchNorm running statistics unsettled
        error = model.appearance_loss(image, model.encode_image(image)[-1], boxes)
    assert error < 0.5 * constant_error
    with pytest.raises(ValueError, match="appearance_loss_weight must be >= 0"):
        DetectorConfig.from_dict({"appearance_loss_weight": -1.0})


def test_task_settings_and_model_kind_are_checked(scenes, tmp_path):
    with pytest.raises(ValueError, match="unknown key 'select_num' in section 'task'"):
        train(scenes, tmp_path / "bad", "max_steps=1", "task.select_num=17")
    with pytest.raises(ValueError, match="kind must be 'class_agnostic_detector'"):
        DetectorConfig.from_dict({"kind": "srec"})
    # A detector config is not a CSRef model config, and the error says which key gave it away.
    with pytest.raises(ValueError, match="unknown key 'kind'"):
        load_model_config("detector_tiny")


def test_annotations_without_objects_are_refused_with_the_fix(scenes, tmp_path):
    annotations = json.loads((scenes / "anns" / "spoken_shapes.json").read_text())
    for entry in annotations["train"]:
        del entry["objects"]
    (tmp_path / "anns").mkdir()
    (tmp_path / "anns" / "spoken_shapes.json").write_text(json.dumps(annotations))
    with pytest.raises(ValueError, match="lists no objects.*regenerate"):
        SceneObjectsDataset(refcoco_layout("spoken_shapes", tmp_path, image_dir=scenes / "images"), "train", 256)
