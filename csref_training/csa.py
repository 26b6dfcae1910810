"""Train CSA (contrastive semantic alignment): pull a speech encoder onto a frozen text space.

    python -m csref_training.csa --config config/train/csa_librispeech.yaml [key=value ...]
    torchrun --nproc_per_node 4 -m csref_training.csa --config ... [key=value ...]

Speech (wav2vec2 + AttFlat) and text (frozen BERT) vectors of a batch of (utterance,
transcript) pairs are L2-normalised and scored with a learnable temperature; the loss is the
symmetric cross-entropy of matching each utterance to its transcript and back (CLIP). Each
process uses its own batch as negatives, as the reference (REFERENCE_FACTS §9). The recipe is
the reference's: Adam 1e-4 (0.9, 0.98), warmup + cosine per iteration, clipping 0.15, no EMA
and no AMP by default. The best checkpoint (`<output_dir>/best`) has the lowest validation
loss; its `speech_encoder.*` weights initialise SREC (`init_speech_encoder` of an SREC config).
"""

import argparse
import logging
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from csref_model.csa import build_csa
from csref_model.text_encoder import load_tokenizer
from csref_training import engine
from csref_training.datasets import build_csa_dataset, collate_csa
from csref_training.evaluate import evaluate_csa

logger = logging.getLogger("csref_training.csa")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="training YAML, e.g. config/train/csa_spoken_shapes.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. epochs=5 data.root=/data optim.lr=2e-4")
    args = parser.parse_args(argv)

    cfg = engine.load_train_config(args.config, args.overrides)
    dist_info = engine.setup_distributed()
    output_dir = Path(cfg.output_dir)
    engine.setup_logging(output_dir, dist_info.rank, "csa")
    engine.configure_determinism(cfg.deterministic)
    engine.seed_all(cfg.seed)
    device = dist_info.device
    model_cfg = engine.build_model_config(cfg)
    per_rank_batch = engine.per_rank_batch_size(cfg.batch_size, dist_info.world_size)
    if dist_info.is_main:
        engine.save_run_config(output_dir, cfg, model_cfg)
        logger.info("world size %d, %d pairs per process per step", dist_info.world_size, per_rank_batch)

    # ---- data: (16 kHz waveform, transcript) pairs from LibriSpeech or a RefCOCO-layout dataset's refs
    train_set = build_csa_dataset(cfg.data, split=cfg.data.train_split, train=True)
    val_set = build_csa_dataset(cfg.data, split=cfg.data.val_split, train=False)
    sampler = engine.ResumableSampler(train_set, dist_info.world_size, dist_info.rank, shuffle=True, seed=cfg.seed)
    train_loader = DataLoader(
        engine.SeededItems(train_set),
        batch_size=per_rank_batch,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_csa,
        pin_memory=device.type == "cuda",
    )
    iters_per_epoch = len(sampler) // per_rank_batch
    if iters_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training pairs are fewer than one batch of {cfg.batch_size}")
    logger.info("train: %d pairs, %d iterations per epoch; val: %d pairs", len(train_set), iters_per_epoch, len(val_set))

    # ---- model (frozen text encoder), tokenizer, optimiser, schedule, AMP, optional EMA
    model = build_csa(model_cfg).to(device)
    engine.freeze_by_prefix(model, cfg.freeze)
    tokenizer = load_tokenizer(model_cfg.text_encoder)
    total_params, trainable_params = engine.count_parameters(model)
    logger.info("CSA: %.2fM parameters, %.2fM trainable", total_params / 1e6, trainable_params / 1e6)
    optimizer, scheduler = engine.build_optimizer_and_scheduler(model, cfg, iters_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    ema = engine.EMA(model, cfg.ema.alpha, cfg.ema.buffers) if cfg.ema.enabled else None

    progress = engine.Progress()
    resume_dir = engine.find_resume_checkpoint(output_dir)
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
            # Dropout and SpecAugment masks depend only on (seed, rank, step): resumption is exact.
            engine.seed_all(engine.derive_seed(cfg.seed, dist_info.rank, progress.global_step))
            input_values = batch["input_values"].to(device, non_blocking=True)  # (B, L)
            attention_mask = batch["attention_mask"].to(device, non_blocking=True)  # (B, L)
            tokens = tokenizer(batch["text"], padding=True, truncation=True, return_tensors="pt")
            text_ids = tokens["input_ids"].to(device)  # (B, N)
            text_mask = tokens["attention_mask"].to(device)  # (B, N)

            with engine.autocast_context(cfg.amp, device):
                loss = train_model(input_values, attention_mask, text_ids, text_mask)
            engine.optimizer_step(loss, model, optimizer, scheduler, scaler, ema, cfg.optim.clip_grad_norm)
            progress.global_step += 1
            progress.epoch_step += 1
            window.add(loss.item(), input_values.shape[0] * dist_info.world_size)
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
        logger.info("epoch %d: trained on %d pairs in %.0f s (%.2f pairs/s)", epoch + 1, epoch_samples,
                    epoch_seconds, epoch_samples / max(epoch_seconds, 1e-9))
        if stop and progress.epoch_step < iters_per_epoch:
            break

        # ---- end of epoch: validation loss + retrieval recall, checkpoint, track the lowest loss
        metrics, is_best = None, False
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs or stop:
            metrics = evaluate_csa(eval_model, val_set, tokenizer, cfg.eval_batch_size, device, dist_info.rank,
                                   dist_info.world_size, num_workers=cfg.data.num_workers)
            logger.info("epoch %d val: loss %.4f  speech->text R@1 %.3f R@5 %.3f  text->speech R@1 %.3f R@5 %.3f",
                        epoch + 1, metrics["loss"], metrics["speech_to_text_r1"], metrics["speech_to_text_r5"],
                        metrics["text_to_speech_r1"], metrics["text_to_speech_r5"])
            if writer is not None:
                for key, value in metrics.items():
                    writer.add_scalar(f"val/{key}", value, progress.global_step)
            if progress.best_metric is None or metrics["loss"] < progress.best_metric:
                progress.best_metric, progress.best_step, is_best = metrics["loss"], progress.global_step, True
        progress.epoch = epoch + 1
        progress.epoch_step = 0
        engine.checkpoint(output_dir, cfg, model_cfg, model, ema, optimizer, scheduler, scaler, progress, dist_info,
                          metrics=metrics, is_best=is_best, keep=cfg.keep_epoch_checkpoints)
        if stop:
            break

    if writer is not None:
        writer.close()
    logger.info("done: best val loss %s at step %s; checkpoints in %s", progress.best_metric, progress.best_step,
                output_dir)
    engine.cleanup_distributed()
    return {"best_loss": progress.best_metric, "global_step": progress.global_step}


if __name__ == "__main__":
    main()
