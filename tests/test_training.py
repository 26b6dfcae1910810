"""Trainers, resumption, DDP and evaluation on a small generated Spoken Shapes set.

Real data (espeak-ng speech, drawn images, the official on-disk layout), real models (a shrunk
tiny config), real processes (torchrun with gloo, SIGKILL).
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from csref_model.checkpoint import save_checkpoint
from csref_model.config import resolve_config_path
from csref_model.refclip import RefCLIPConfig
from csref_model.csa import build_csa
from csref_model.srec import build_srec
from csref_model.text_encoder import load_tokenizer
from csref_model.typed_yaml import read_yaml
from csref_training import evaluate
from csref_training.checkpointing import TRAINER_STATE
from csref_training.davenet import davenet_model_config
from csref_training.detector import detector_model_config
from csref_training.im2sp import task_settings as im2sp_task_settings
from csref_training.refclip import task_settings as refclip_task_settings
from csref_training.ssc import ssc_model_config
from csref_training.optim import EMA, build_optimizer_and_scheduler, set_train_mode, warmup_cosine_lr
from csref_training.reproducibility import seed_all
from csref_training.train_config import build_model_config, load_train_config
from csref_training.datasets import build_csa_dataset, build_srec_dataset, collate_csa, collate_srec
from csref_training.spoken_shapes.generate import SynthConfig, generate_dataset
from training_support import REPO, TEST_MODEL, run_module, subprocess_env, write_config

SPLIT_SIZES = {"train": 16, "val": 6, "test": 5}


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spoken_shapes")
    generate_dataset(SynthConfig(out=root, seed=3, voices=("en-us+m3", "en-gb+f2", "en-029")), SPLIT_SIZES)
    return root


# ----------------------------------------------------------------------------------------
# Config and schedule


def test_config_overrides_and_unknown_keys(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", tmp_path, tmp_path / "out")
    cfg = load_train_config(path, ["optim.lr=2e-4", "multi_scale.enabled=false", "data.speakers=[a, b]"])
    assert cfg.optim.lr == 2e-4 and cfg.multi_scale.enabled is False and cfg.data.speakers == ["a", "b"]
    with pytest.raises(ValueError, match=r"c\.yaml: unknown key 'learning_rate' in section 'optim' \(valid keys: "):
        load_train_config(path, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="epochs must be an integer, got 'many'"):
        load_train_config(path, ["epochs=many"])
    with pytest.raises(ValueError, match=r"data\.max_duration must be a number or null, got 'long'"):
        load_train_config(path, ["data.max_duration=long"])
    with pytest.raises(ValueError, match=r"optim\.lr must be > 0 .* got 0\.0; freeze modules"):
        load_train_config(path, ["optim.lr=0.0"])


@pytest.mark.parametrize("path", sorted((REPO / "config" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_training_configs_load(path: Path) -> None:
    """Every shipped YAML loads, and so does its task's model config (named by the file's prefix)."""
    cfg = load_train_config(path)
    task = path.name.split("_")[0]
    if task in ("csa", "srec"):
        assert build_model_config(cfg).image_size > 0
    elif task == "detector":
        assert detector_model_config(cfg).image_size > 0
    elif task == "davenet":
        assert davenet_model_config(cfg).image.image_size > 0
    elif task == "ssc":
        assert ssc_model_config(cfg).mask_head.enabled
    elif task == "im2sp":
        # Its image-encoder config and unit count come from a checkpoint and units made first.
        settings = im2sp_task_settings(cfg)
        assert cfg.model in ("im2sp", "unit_vocoder") and settings.units.checkpoint and settings.units.num_units > 0
    else:
        assert task == "refclip"
        # Its detector and speech-encoder configs come from checkpoints that are trained first.
        settings = refclip_task_settings(cfg)
        model_tree = read_yaml(resolve_config_path(cfg.model), "RefCLIP model config")
        assert RefCLIPConfig.from_dict(model_tree).select_num == 17 and settings.detector_checkpoint
    assert cfg.epochs > 0


def test_schedule_matches_reference_formula(tmp_path: Path) -> None:
    cfg = load_train_config(write_config(tmp_path / "c.yaml", tmp_path, tmp_path / "o"),
                                   ["epochs=10", "optim.warmup_epochs=3", "optim.lr=1e-4",
                                    "optim.warmup_lr=1e-7", "optim.min_lr=1e-6"])
    iters = 7
    t, total = 3 * iters, 10 * iters
    assert warmup_cosine_lr(0, iters, cfg) == pytest.approx(1e-7)
    assert warmup_cosine_lr(5, iters, cfg) == pytest.approx(1e-7 + 5 * (1e-4 - 1e-7) / t)
    assert warmup_cosine_lr(t, iters, cfg) == pytest.approx(1e-4)
    s = 50
    expected = 1e-6 + 0.5 * (1e-4 - 1e-6) * (1 + np.cos(np.pi * (s - t) / (total - t)))
    assert warmup_cosine_lr(s, iters, cfg) == pytest.approx(expected)


def test_ema_decay_and_int_buffers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, alpha=0.9997, buffers=True)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.train()(torch.randn(4, 2))
    ema.update(model)
    decay = min(0.9997, 1 / 10)
    assert torch.allclose(ema.model[0].weight, decay * start + (1 - decay) * model[0].weight)
    assert ema.model[1].num_batches_tracked.item() == 1


# ----------------------------------------------------------------------------------------
# One optimisation step on a fixed batch lowers the loss


def _seeded(compute_loss, seed: int) -> torch.Tensor:
    # Same dropout / SpecAugment masks before and after the step; BatchNorm uses batch statistics.
    seed_all(seed)
    return compute_loss()


def test_srec_step_lowers_loss(shapes_root: Path, tmp_path: Path) -> None:
    cfg = load_train_config(write_config(tmp_path / "c.yaml", shapes_root, tmp_path / "o"),
                                   ["optim.warmup_epochs=0"])
    model_cfg = build_model_config(cfg)
    dataset = build_srec_dataset(cfg.data, split="train", image_size=model_cfg.image_size, train=True)
    batch = collate_srec([dataset[i] for i in range(4)])
    seed_all(0)  # the random initialisation is part of the fixed test case
    model = build_srec(model_cfg).train()
    optimizer, _ = build_optimizer_and_scheduler(model, cfg, iters_per_epoch=10)

    def compute_loss() -> torch.Tensor:
        return model(batch["image"], batch["input_values"], batch["attention_mask"], targets=batch["label"])

    # A few steps: SimOTA re-assigns positives after each step, so one step alone may not descend.
    losses = []
    for _ in range(3):
        loss = _seeded(compute_loss, seed=1)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
        optimizer.step()
    after = _seeded(compute_loss, seed=1)
    assert all(map(math.isfinite, losses)) and after.item() < losses[0]


def test_csa_step_lowers_loss(shapes_root: Path, tmp_path: Path) -> None:
    cfg = load_train_config(write_config(tmp_path / "c.yaml", shapes_root, tmp_path / "o"),
                                   ["optim.warmup_epochs=0", "ema.enabled=false"])
    model_cfg = build_model_config(cfg)
    dataset = build_csa_dataset(cfg.data, split="train", train=True)
    batch = collate_csa([dataset[i] for i in range(6)])
    seed_all(0)
    model = build_csa(model_cfg)
    set_train_mode(model, frozen_modules_train_mode=False)
    tokens = load_tokenizer(model_cfg.text_encoder)(batch["text"], padding=True, return_tensors="pt")
    inputs = (batch["input_values"], batch["attention_mask"], tokens["input_ids"], tokens["attention_mask"])
    optimizer, _ = build_optimizer_and_scheduler(model, cfg, iters_per_epoch=10)
    before = _seeded(lambda: model(*inputs), seed=1)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    after = _seeded(lambda: model(*inputs), seed=1)
    assert torch.isfinite(before) and after.item() < before.item()


# ----------------------------------------------------------------------------------------
# Whole runs: DDP through torchrun, SIGKILL + automatic resume


def _final_weights(output_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    last = (output_dir / "last").resolve()
    state = torch.load(last / TRAINER_STATE, map_location="cpu", weights_only=True)
    return load_file(str(last / "model.safetensors")), state["raw_model"]


def test_ddp_two_processes_gloo(shapes_root: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "ddp"
    config = write_config(tmp_path / "c.yaml", shapes_root, output_dir, epochs=1)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "csref_training.srec", "--config", str(config)],
        # gloo would otherwise pick the interface the host name resolves to; the test stays on loopback.
        env={**subprocess_env(), "GLOO_SOCKET_IFNAME": "lo"}, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    log = (output_dir / "srec.log").read_text()
    assert "world size 2, 2 samples per process per step" in log
    last = (output_dir / "last").resolve()
    state = torch.load(last / TRAINER_STATE, map_location="cpu", weights_only=True)
    # 16 samples / (2 processes x 2 per process) = 4 steps, validation on all 6 val samples.
    assert state["world_size"] == 2 and state["progress"]["global_step"] == 4
    metrics = json.loads((last / "metrics.json").read_text())
    assert metrics["count"] == SPLIT_SIZES["val"]
    assert (output_dir / "best").resolve() == last


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(shapes_root: Path, tmp_path: Path) -> None:
    overrides = {"epochs": 2, "save_every": 1, "batch_size": 2}  # 8 steps per epoch, a checkpoint after each
    reference_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    reference_cfg = write_config(tmp_path / "a.yaml", shapes_root, reference_dir, **overrides)
    killed_cfg = write_config(tmp_path / "b.yaml", shapes_root, killed_dir, **overrides)
    run_module("csref_training.srec", reference_cfg)

    process = subprocess.Popen([sys.executable, "-m", "csref_training.srec", "--config", str(killed_cfg)],
                               env=subprocess_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    killed_at = None
    while time.monotonic() < deadline and process.poll() is None:
        last = killed_dir / "last"
        if last.is_symlink() and os.readlink(last) >= "checkpoints/step_00000003":
            process.send_signal(signal.SIGKILL)
            killed_at = os.readlink(last)
            break
        time.sleep(0.02)
    process.wait(timeout=60)
    assert killed_at is not None, "the run finished or stalled before a mid-epoch checkpoint could be killed"
    assert process.returncode == -signal.SIGKILL

    result = run_module("csref_training.srec", killed_cfg)
    assert "resumed from" in result.stderr
    (ref_weights, ref_raw), (resumed_weights, resumed_raw) = _final_weights(reference_dir), _final_weights(killed_dir)
    assert ref_weights.keys() == resumed_weights.keys()
    # Exact: same data order, per-item seeds and per-step RNG, one thread in both runs.
    for key in ref_weights:
        assert torch.equal(ref_weights[key], resumed_weights[key]), key
    for key in ref_raw:
        assert torch.equal(ref_raw[key], resumed_raw[key]), key


def test_csa_run_keeps_the_lowest_validation_loss_as_best(shapes_root: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "csa"
    config = write_config(tmp_path / "csa.yaml", shapes_root, output_dir, epochs=2, keep_epoch_checkpoints=True,
                          **{"ema.enabled": False})
    run_module("csref_training.csa", config)
    log = (output_dir / "csa.log").read_text()
    assert "world size 1, 4 samples per process per step" in log and log.count(" val: count 6  loss ") == 2
    epochs = sorted((output_dir / "checkpoints").glob("step_*"))
    losses = {path: json.loads((path / "metrics.json").read_text())["loss"] for path in epochs}
    assert len(losses) == 2 and (output_dir / "last").resolve() == epochs[-1]
    assert (output_dir / "best").resolve() == min(losses, key=losses.get)
    # The CSA checkpoint holds the text encoder: evaluate recognises it and reproduces the loss.
    out = tmp_path / "csa.json"
    evaluate.main(["--config", str(config), "--checkpoint", str(epochs[-1]), "--splits", "val", "--json", str(out)])
    assert json.loads(out.read_text())["splits"]["val"]["loss"] == pytest.approx(losses[epochs[-1]], rel=1e-5)


# ----------------------------------------------------------------------------------------
# Evaluation


def test_box_iou_and_strict_threshold() -> None:
    pred = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=np.float64)
    gt = np.array([[0, 0, 10, 10], [0, 0, 10, 20], [5, 0, 15, 10], [0, 0, 10, 10]], dtype=np.float64)
    iou, sums = evaluate.score_boxes(pred, gt)
    assert iou == pytest.approx([1.0, 0.5, 50 / 150, 0.0])
    # IoU exactly 0.5 is a miss, as the reference.
    assert sums == {"count": 4, "hits_50": 1, "hits_75": 1, "iou_sum": pytest.approx(1.5 + 50 / 150)}


def test_evaluate_official_pth_matches_our_format(shapes_root: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", shapes_root, tmp_path / "o")
    cfg = load_train_config(config)
    model_cfg = build_model_config(cfg)
    seed_all(5)
    model = build_srec(model_cfg)
    official = tmp_path / "csref_official.pth"
    torch.save({"epoch": 3, "state_dict": model.state_dict(), "optimizer": {}, "scheduler": {}, "lr": 1e-4}, official)
    ours = save_checkpoint(tmp_path / "ours", model, model_cfg)

    out_official, out_ours = tmp_path / "official.json", tmp_path / "ours.json"
    evaluate.main(["--config", str(config), "--checkpoint", str(official), "--splits", "val,test",
                   "--json", str(out_official), "--save-vis", str(tmp_path / "vis")])
    evaluate.main(["--config", str(config), "--checkpoint", str(ours), "--splits", "val,test", "--json", str(out_ours)])
    official_result = json.loads(out_official.read_text())
    assert json.loads(out_ours.read_text())["splits"] == official_result["splits"]
    for split in ("val", "test"):
        metrics = official_result["splits"][split]
        assert metrics["count"] == SPLIT_SIZES[split]
        for key in ("acc_50", "acc_75", "mean_iou"):
            assert 0.0 <= metrics[key] <= 1.0
        assert metrics["acc_75"] <= metrics["acc_50"]
    assert len(list((tmp_path / "vis" / "val").glob("*.jpg"))) == SPLIT_SIZES["val"]


def test_evaluate_under_bf16_autocast(shapes_root: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", shapes_root, tmp_path / "o")
    model_cfg = build_model_config(load_train_config(config))
    seed_all(5)
    checkpoint = save_checkpoint(tmp_path / "ours", build_srec(model_cfg), model_cfg)
    results = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.json"
        evaluate.main(["--config", str(config), "--checkpoint", str(checkpoint), "--splits", "val",
                       "--precision", precision, "--json", str(out)])
        results[precision] = json.loads(out.read_text())
    assert results["bf16"]["precision"] == "bf16"
    fp32, bf16 = results["fp32"]["splits"]["val"], results["bf16"]["splits"]["val"]
    assert bf16["count"] == fp32["count"] == SPLIT_SIZES["val"]
    # Random weights: boxes move with rounding, but a broken reduced-precision path (NaN boxes,
    # a dtype error) would not come close.
    assert abs(bf16["mean_iou"] - fp32["mean_iou"]) < 0.2


def test_evaluate_checkpoint_directory_without_training_config(shapes_root: Path, tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "c.yaml", shapes_root, tmp_path / "o")
    model_cfg = build_model_config(load_train_config(config))
    seed_all(5)
    checkpoint = save_checkpoint(tmp_path / "ours", build_srec(model_cfg), model_cfg)
    with_config, without_config = tmp_path / "with.json", tmp_path / "without.json"
    evaluate.main(["--config", str(config), "--checkpoint", str(checkpoint), "--splits", "val",
                   "--json", str(with_config)])
    # Data root and dataset from the flags, every other data option at its default. The batch size
    # is the config's: wav2vec2's GroupNorm spans the padded batch, so it moves the boxes a little.
    evaluate.main(["--checkpoint", str(checkpoint), "--data-root", str(shapes_root), "--dataset", "spoken_shapes",
                   "--batch-size", "4", "--num-workers", "0", "--splits", "val", "--json", str(without_config)])
    result = json.loads(without_config.read_text())
    assert result["config"] is None and result["splits"]["val"]["count"] == SPLIT_SIZES["val"]
    assert result["splits"] == json.loads(with_config.read_text())["splits"]
    # Without --dataset the data root is read as RefCOCO-speech: a clear error naming what is there.
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint", str(checkpoint), "--data-root", str(shapes_root), "--splits", "val"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: audio directory not found" in err and "holds spoken_shapes" in err


def test_evaluate_csa_checkpoint_reports_retrieval(shapes_root: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", shapes_root, tmp_path / "o")
    model_cfg = build_model_config(load_train_config(config))
    csa_dir = save_checkpoint(tmp_path / "csa", build_csa(model_cfg), model_cfg)
    out = tmp_path / "csa.json"
    evaluate.main(["--config", str(config), "--checkpoint", str(csa_dir), "--splits", "val", "--json", str(out)])
    metrics = json.loads(out.read_text())["splits"]["val"]
    assert metrics["count"] == SPLIT_SIZES["val"]
    assert metrics["loss"] > 0
    for direction in ("speech_to_text", "text_to_speech"):
        recalls = [metrics[f"{direction}_r{k}"] for k in (1, 5, 10)]
        assert all(0.0 <= r <= 1.0 for r in recalls) and recalls == sorted(recalls)


def test_srec_init_from_csa_checkpoint_reports_what_it_loaded(shapes_root: Path, tmp_path: Path) -> None:
    # An official-format CSA file of the same (test-sized) speech encoder.
    csa_cfg = load_train_config(write_config(tmp_path / "csa.yaml", shapes_root, tmp_path / "csa"))
    seed_all(0)
    csa = build_csa(build_model_config(csa_cfg))
    csa_file = tmp_path / "CSA_speech_encoder.pth"
    torch.save({"epoch": 1, "state_dict": csa.state_dict(), "optimizer": {}, "scheduler": {}, "lr": 1e-4}, csa_file)

    output_dir = tmp_path / "srec"
    config = write_config(tmp_path / "srec.yaml", shapes_root, output_dir, epochs=1, max_steps=1,
                          init_speech_encoder=str(csa_file))
    run_module("csref_training.srec", config)
    report = json.loads((output_dir / "init_report.json").read_text())
    speech_keys = {k for k in csa.state_dict() if k.startswith("speech_encoder.")}
    assert report["source"] == str(csa_file)
    assert set(report["loaded"]) == speech_keys
    # SREC's layer fusion does not exist in CSA: it keeps its fresh initialisation, and says so.
    assert report["missing"] and all(k.startswith("speech_encoder.fusion_modules.") for k in report["missing"])
    assert "contrastive_loss.logit_scale" in report["unexpected"]
    log = (output_dir / "srec.log").read_text()
    assert f"NOT loaded (keep their fresh initialisation): {len(report['missing'])} tensors" in log


def test_srec_fine_tune_from_srec_checkpoint_then_csa_speech_encoder(shapes_root: Path, tmp_path: Path) -> None:
    srec_config = load_train_config(write_config(tmp_path / "base.yaml", shapes_root, tmp_path / "base"))
    model_config = build_model_config(srec_config)
    seed_all(1)
    start = build_srec(model_config)
    save_checkpoint(tmp_path / "start", start, model_config)
    seed_all(2)
    csa = build_csa(model_config)
    csa_file = tmp_path / "CSA_speech_encoder.pth"
    torch.save({"state_dict": csa.state_dict()}, csa_file)

    output_dir = tmp_path / "finetune"
    config = write_config(tmp_path / "finetune.yaml", shapes_root, output_dir, epochs=1, max_steps=1,
                          freeze=["speech_encoder", "visual_encoder"], frozen_modules_train_mode=False,
                          init_checkpoint=str(tmp_path / "start"), init_speech_encoder=str(csa_file))
    result = run_module("csref_training.srec", config)
    assert f"whole model initialised from {tmp_path / 'start'}: {len(start.state_dict())} tensors" in result.stderr
    weights, _ = _final_weights(output_dir)
    # Frozen parts keep their initialisation: the speech encoder is CSA's (it replaced the SREC
    # checkpoint's), the visual encoder the SREC checkpoint's.
    for key, value in csa.state_dict().items():
        if key.startswith("speech_encoder."):
            torch.testing.assert_close(weights[key], value, rtol=0, atol=0)
    visual = {k: v for k, v in start.state_dict().items() if k.startswith("visual_encoder.") and v.is_floating_point()}
    assert visual
    for key, value in visual.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0)


def test_csa_continues_the_speech_encoder_of_an_srec_checkpoint(shapes_root: Path, tmp_path: Path) -> None:
    """CSA's init_speech_encoder takes an SREC directory (the demo model's encoder, to go on aligning
    it on other engines): every speech tensor lands, the SREC's other tensors are reported unused."""
    srec_config = load_train_config(write_config(tmp_path / "srec.yaml", shapes_root, tmp_path / "s"))
    model_config = build_model_config(srec_config)
    seed_all(3)
    srec = build_srec(model_config)
    save_checkpoint(tmp_path / "srec_dir", srec, model_config)

    output_dir = tmp_path / "csa"
    config = write_config(tmp_path / "csa.yaml", shapes_root, output_dir, epochs=1, max_steps=1,
                          init_speech_encoder=str(tmp_path / "srec_dir"), freeze=["speech_encoder"])
    run_module("csref_training.csa", config)
    report = json.loads((output_dir / "init_report.json").read_text())
    csa_speech_keys = {k for k in build_csa(model_config).state_dict() if k.startswith("speech_encoder.")}
    assert set(report["loaded"]) == csa_speech_keys and not report["missing"]
    assert any(k.startswith("visual_encoder.") for k in report["unexpected"])
    weights, _ = _final_weights(output_dir)
    for key in csa_speech_keys:  # frozen: still the SREC's encoder after a step
        torch.testing.assert_close(weights[key], srec.state_dict()[key], rtol=0, atol=0)


def test_srec_fine_tune_from_mismatching_checkpoint_fails_before_training(shapes_root: Path, tmp_path: Path) -> None:
    wider_fusion = {**TEST_MODEL, "fusion": {"hidden_size": 48}}
    other_config = load_train_config(write_config(tmp_path / "other.yaml", shapes_root, tmp_path / "o",
                                                         model_overrides=wider_fusion))
    other_model_config = build_model_config(other_config)
    save_checkpoint(tmp_path / "other", build_srec(other_model_config), other_model_config)

    output_dir = tmp_path / "finetune"
    config = write_config(tmp_path / "finetune.yaml", shapes_root, output_dir, epochs=1, max_steps=1,
                          init_checkpoint=str(tmp_path / "other"))
    result = run_module("csref_training.srec", config, check=False)
    assert result.returncode != 0
    assert f"checkpoint {tmp_path / 'other'} does not match the model" in result.stderr
    assert "shape mismatches" in result.stderr
    assert not (output_dir / "last").exists()
