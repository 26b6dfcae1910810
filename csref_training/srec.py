"""Train SREC (speech referring expression comprehension): image + spoken expression -> box.

    python -m csref_training.srec --config config/train/srec_refcoco_speech.yaml [key=value ...]
    torchrun --nproc_per_node 4 -m csref_training.srec --config ... [key=value ...]

The recipe is the reference's (REFERENCE_FACTS §10): Adam 1e-4 (0.9, 0.98), per-iteration
warmup + cosine schedule, gradient clipping 0.15, EMA 0.9997 of parameters and buffers,
multi-scale training on the letterboxed batch, the speech encoder initialised from a CSA
checkpoint (to fine-tune, the whole model from an SREC checkpoint first). The run resumes
automatically from `<output_dir>/last`; `<output_dir>/best` is the checkpoint with the highest
validation Acc@0.5. Checkpoints hold the EMA weights (the inference format); `trainer_state.pt`
next to them holds what exact resumption needs.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from csref_model.checkpoint import load_csa_speech_encoder, load_srec_weights
from csref_model.srec import build_srec
from csref_training import engine
from csref_training.datasets import build_srec_dataset, collate_srec
from csref_training.evaluate import evaluate_srec

logger = logging.getLogger("csref_training.srec")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="training YAML, e.g. config/train/srec_spoken_shapes.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. epochs=5 data.root=/data optim.lr=2e-4")
    args = parser.parse_args(argv)

    cfg = engine.load_train_config(args.config, args.overrides)
    dist_info = engine.setup_distributed()
    output_dir = Path(cfg.output_dir)
    engine.setup_logging(output_dir, dist_info.rank, "srec")
    engine.configure_determinism(cfg.deterministic)
    engine.seed_all(cfg.seed)
    device = dist_info.device
    model_cfg = engine.build_model_config(cfg)
    per_rank_batch = engine.per_rank_batch_size(cfg.batch_size, dist_info.world_size)
    if dist_info.is_main:
        engine.save_run_config(output_dir, cfg, model_cfg)
        logger.info("world size %d, %d samples per process per step", dist_info.world_size, per_rank_batch)

    # ---- data: RefCOCO-speech layout (or its HF variant); letterboxed images, raw 16 kHz audio
    train_set = build_srec_dataset(cfg.data, split=cfg.data.train_split, image_size=model_cfg.image_size, train=True)
    val_set = build_srec_dataset(cfg.data, split=cfg.data.val_split, image_size=model_cfg.image_size, train=False)
    sampler = engine.ResumableSampler(train_set, dist_info.world_size, dist_info.rank, shuffle=True, seed=cfg.seed)
    train_loader = DataLoader(
        engine.SeededItems(train_set),
        batch_size=per_rank_batch,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_srec,
        pin_memory=device.type == "cuda",
    )
    iters_per_epoch = len(sampler) // per_rank_batch
    if iters_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training samples are fewer than one batch of {cfg.batch_size}")
    logger.info("train: %d samples, %d iterations per epoch; val: %d samples", len(train_set), iters_per_epoch, len(val_set))

    # ---- model, optimiser, schedule, AMP, EMA
    model = build_srec(model_cfg).to(device)
    engine.freeze_by_prefix(model, cfg.freeze)
    total_params, trainable_params = engine.count_parameters(model)
    logger.info("SREC: %.2fM parameters, %.2fM trainable", total_params / 1e6, trainable_params / 1e6)
    optimizer, scheduler = engine.build_optimizer_and_scheduler(model, cfg, iters_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    # ---- resume from the output directory, else initialise from an SREC and/or a CSA checkpoint
    progress = engine.Progress()
    resume_dir = engine.find_resume_checkpoint(output_dir)
    if resume_dir is None and cfg.init_checkpoint:
        report = load_srec_weights(model, cfg.init_checkpoint)
        logger.info("whole model initialised from %s: %d tensors", cfg.init_checkpoint, len(report.loaded))
    if resume_dir is None and cfg.init_speech_encoder:
        report = load_csa_speech_encoder(model, cfg.init_speech_encoder)
        engine.log_init_report(output_dir, cfg.init_speech_encoder, report, dist_info.is_main)
    ema = engine.EMA(model, cfg.ema.alpha, cfg.ema.buffers) if cfg.ema.enabled else None
    if resume_dir is not None:
        progress = engine.resume(resume_dir, model, optimizer, scheduler, scaler, ema, dist_info.world_size)
        logger.info("resumed from %s at epoch %d, step %d", resume_dir, progress.epoch, progress.global_step)

    train_model = model
    if dist_info.world_size > 1:
        device_ids = [dist_info.local_rank] if device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=cfg.find_unused_parameters)
    writer = SummaryWriter(str(output_dir / "tensorboard")) if dist_info.is_main else None
    eval_model = ema.model if ema is not None else model

    # ---- training loop
    stop = False
    for epoch in range(progress.epoch, cfg.epochs):
        sampler.set_epoch(epoch, start=progress.epoch_step * per_rank_batch)
        engine.set_train_mode(model, cfg.frozen_modules_train_mode)
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", initial=progress.epoch_step,
                   total=iters_per_epoch, disable=not dist_info.is_main, dynamic_ncols=True)
        window = engine.LossWindow(logger, writer, device)
        epoch_start, epoch_start_step = time.perf_counter(), progress.epoch_step
        for batch in bar:
            # Dropout, SpecAugment masks and the multi-scale draw depend only on (seed, step).
            engine.seed_all(engine.derive_seed(cfg.seed, dist_info.rank, progress.global_step))
            image = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S) letterboxed, [0, 1]
            input_values = batch["input_values"].to(device, non_blocking=True)  # (B, L)
            attention_mask = batch["attention_mask"].to(device, non_blocking=True)  # (B, L)
            targets = batch["label"].to(device, non_blocking=True)  # (B, 4) normalised cx, cy, w, h
            if cfg.multi_scale.enabled:
                sizes = cfg.multi_scale.sizes
                side = sizes[engine.derive_seed(cfg.seed, progress.global_step, 7) % len(sizes)]
                # Nearest, as the reference; labels are normalised so they need no change.
                image = F.interpolate(image, size=(side, side))

            with engine.autocast_context(cfg.amp, device):
                loss = train_model(image, input_values, attention_mask, targets=targets)
            engine.optimizer_step(loss, model, optimizer, scheduler, scaler, ema, cfg.optim.clip_grad_norm)
            progress.global_step += 1
            progress.epoch_step += 1
            window.add(loss.item(), image.shape[0] * dist_info.world_size)
            if progress.global_step % cfg.log_every == 0 or progress.epoch_step == iters_per_epoch:
                window.report(epoch + 1, progress.global_step, optimizer.param_groups[0]["lr"], bar)

            stop = cfg.max_steps is not None and progress.global_step >= cfg.max_steps
            mid_epoch = progress.epoch_step < iters_per_epoch
            if mid_epoch and (stop or (cfg.save_every and progress.global_step % cfg.save_every == 0)):
                engine.checkpoint(output_dir, cfg, model_cfg, model, ema, optimizer, scheduler, scaler, progress,
                                  dist_info, metrics=None, is_best=False)
            if stop:
                break
        bar.close()
        epoch_samples = (progress.epoch_step - epoch_start_step) * cfg.batch_size
        epoch_seconds = time.perf_counter() - epoch_start
        logger.info("epoch %d: trained on %d samples in %.0f s (%.2f samples/s)", epoch + 1, epoch_samples,
                    epoch_seconds, epoch_samples / max(epoch_seconds, 1e-9))
        if stop and progress.epoch_step < iters_per_epoch:
            break

        # ---- end of epoch: validate the EMA weights, checkpoint, track the best Acc@0.5
        metrics, is_best = None, False
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs or stop:
            metrics = evaluate_srec(eval_model, val_set, cfg.eval_batch_size, device, dist_info.rank,
                                    dist_info.world_size, num_workers=cfg.data.num_workers)
            logger.info("epoch %d val: Acc@0.5 %.4f  Acc@0.75 %.4f  mean IoU %.4f  (%d samples)", epoch + 1,
                        metrics["acc_50"], metrics["acc_75"], metrics["mean_iou"], metrics["count"])
            if writer is not None:
                for key in ("acc_50", "acc_75", "mean_iou"):
                    writer.add_scalar(f"val/{key}", metrics[key], progress.global_step)
            if progress.best_metric is None or metrics["acc_50"] > progress.best_metric:
                progress.best_metric, progress.best_step, is_best = metrics["acc_50"], progress.global_step, True
        progress.epoch = epoch + 1
        progress.epoch_step = 0
        engine.checkpoint(output_dir, cfg, model_cfg, model, ema, optimizer, scheduler, scaler, progress, dist_info,
                          metrics=metrics, is_best=is_best, keep=cfg.keep_epoch_checkpoints)
        if stop:
            break

    if writer is not None:
        writer.close()
    logger.info("done: best val Acc@0.5 %s at step %s; checkpoints in %s", progress.best_metric, progress.best_step,
                output_dir)
    engine.cleanup_distributed()
    return {"best_acc_50": progress.best_metric, "global_step": progress.global_step}


if __name__ == "__main__":
    main()
