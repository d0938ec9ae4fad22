"""The fine-tuning loop: a head-only phase, then the whole net at a lower rate.

Recipe (what works for a few dozen crops per class on a CPU):

- head phase: backbone frozen, BatchNorm statistics frozen too (a new head
  learns on ImageNet features without the small batches disturbing them);
- full phase: every layer, AdamW at a lower peak rate, one-cycle schedule
  (warm-up then cosine decay);
- label smoothing, augmentations from :mod:`training.augment`;
- early stopping on validation accuracy (ties broken by validation NLL); the
  best epoch's weights are kept;
- AMP (float16 autocast and a gradient scaler) on CUDA only.

Everything random draws from one seeded generator, so ``seed`` repeats a run
on the same machine and thread count.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from training.augment import augment
from training.data import CropSet
from training.model import BeltNet
from training.recipe import AugmentConfig, FitConfig

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: BeltNet  # best epoch's weights, eval mode, on the training device
    history: list[dict]
    best_epoch: int
    stopped_early: bool


def predict_logits(
    model: BeltNet, images: np.ndarray, device: torch.device, batch_size: int = 128
) -> np.ndarray:
    """Logits ``(N, C)`` float32 for uint8 BGR crops ``(N, S, S, 3)``."""
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(device)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                out.append(model(batch).float().cpu())
    return torch.cat(out).numpy()


def train(
    model: BeltNet,
    cfg: FitConfig,
    train_set: CropSet,
    val_set: CropSet | None,
    device: torch.device,
) -> TrainResult:
    """Fine-tune ``model`` in place and return it with the best epoch's weights.

    Without ``val_set`` there is no early stopping and the last epoch is kept
    (the comparison trains to a fixed budget this way).
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    aug_cfg = AugmentConfig(**cfg.augment)
    model.to(device)
    images = torch.from_numpy(train_set.images).to(device)
    targets = torch.from_numpy(train_set.targets).to(device)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    head_epochs = min(cfg.head_epochs, cfg.epochs)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    history: list[dict] = []
    best = {"key": (-1.0, -math.inf), "epoch": 0, "state": None}
    stale = 0
    stopped_early = False
    optimizer = scheduler = None
    phase = None
    # Bars only on a terminal (disable=None); a log file gets one summary line per epoch.
    with (
        logging_redirect_tqdm(),
        tqdm(range(1, cfg.epochs + 1), desc="epochs", unit="ep", disable=None) as bar,
    ):
        for epoch in bar:
            # Phase switch: a new optimizer and schedule for each phase
            wanted = "head" if epoch <= head_epochs else "full"
            if wanted != phase:
                phase = wanted
                optimizer, scheduler = _phase_optimizer(
                    model, cfg, phase, steps_per_epoch * _phase_epochs(cfg, phase, head_epochs)
                )

            # One pass over the shuffled, augmented training crops
            started = time.perf_counter()
            _set_train_mode(model, cfg, phase)
            order = torch.randperm(len(train_set), generator=generator).to(device)
            loss_sum, correct = 0.0, 0
            batches = tqdm(
                range(steps_per_epoch),
                desc=f"{phase} {epoch}",
                unit="batch",
                leave=False,
                disable=None,
            )
            for step in batches:
                index = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                x = augment(images[index], generator, aug_cfg)
                y = targets[index]
                with torch.autocast(device.type, enabled=use_amp):
                    logits = model(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                loss_sum += loss.item() * len(y)
                correct += int((logits.argmax(1) == y).sum())
            row = {
                "epoch": epoch,
                "phase": phase,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": loss_sum / len(train_set),
                "train_acc": correct / len(train_set),
                "val_loss": math.nan,
                "val_acc": math.nan,
            }

            # Validation, best-epoch bookkeeping, early stopping
            if val_set is not None:
                logits = torch.from_numpy(predict_logits(model, val_set.images, device))
                val_targets = torch.from_numpy(val_set.targets)
                row["val_loss"] = float(F.cross_entropy(logits, val_targets))
                row["val_acc"] = float((logits.argmax(1) == val_targets).float().mean())
                key = (row["val_acc"], -row["val_loss"])
                if key > best["key"]:
                    best = {"key": key, "epoch": epoch, "state": _cpu_state(model)}
                    stale = 0
                elif phase == "full":
                    stale += 1
            row["seconds"] = round(time.perf_counter() - started, 2)
            history.append(row)
            log.info(_summary(row, cfg.epochs))
            bar.set_postfix(val_acc=row["val_acc"], loss=round(row["train_loss"], 3))
            if val_set is not None and stale >= cfg.patience:
                log.info("no better validation score for %d epochs; stopping", cfg.patience)
                stopped_early = True
                break

    if best["state"] is not None:
        model.load_state_dict(best["state"])
    best_epoch = best["epoch"] or history[-1]["epoch"]
    model.eval()
    return TrainResult(model, history, best_epoch, stopped_early)


def _phase_epochs(cfg: FitConfig, phase: str, head_epochs: int) -> int:
    return head_epochs if phase == "head" else max(1, cfg.epochs - head_epochs)


def _frozen(model: BeltNet, cfg: FitConfig, phase: str) -> torch.nn.Module:
    """The backbone blocks that stay as ImageNet left them in this phase."""
    if phase == "head":
        return model.backbone.features
    return model.backbone.features[: cfg.freeze_blocks]


def _phase_optimizer(model: BeltNet, cfg: FitConfig, phase: str, total_steps: int):
    model.requires_grad_(True)
    _frozen(model, cfg, phase).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    peak = cfg.lr_head if phase == "head" else cfg.lr
    optimizer = torch.optim.AdamW(params, lr=peak, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=peak,
        total_steps=max(1, total_steps),
        pct_start=0.15,
        # A head on fixed features needs no warm-up from a tiny rate.
        div_factor=1.0 if phase == "head" else 25.0,
    )
    return optimizer, scheduler


def _set_train_mode(model: BeltNet, cfg: FitConfig, phase: str) -> None:
    model.train()
    # Frozen means frozen: BatchNorm keeps ImageNet's running statistics.
    _frozen(model, cfg, phase).eval()


def _cpu_state(model: BeltNet) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in copy.copy(model.state_dict()).items()}


def _summary(row: dict, epochs: int) -> str:
    text = (
        f"epoch {row['epoch']}/{epochs} {row['phase']:<4} lr {row['lr']:.2e} "
        f"train loss {row['train_loss']:.3f} acc {row['train_acc']:.3f}"
    )
    if not math.isnan(row["val_acc"]):
        text += f"  val loss {row['val_loss']:.3f} acc {row['val_acc']:.4f}"
    return text + f"  ({row['seconds']:.1f} s)"
