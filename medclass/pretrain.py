"""Self-supervised pretraining on unlabelled images: ``medclass pretrain``.

SimCLR (Chen et al. 2020): two augmented views of every image, an MLP projection of
the encoder's pooled embedding, and MONAI's :class:`~monai.losses.ContrastiveLoss`
(NT-Xent) pulling the two views of an image together and pushing the other images of
the batch away. The views are made on the batch tensor (random resized crop, rotation
and flip with one ``affine_grid``/``grid_sample`` call; brightness, contrast, gamma,
blur and noise as tensor arithmetic), so augmentation costs little next to the network
on a CPU.

The run is resumable: ``DIR/pretrain_state.pt`` holds the encoder, projector, optimiser
and random state after every epoch (and at Ctrl-C), and running the same command again
continues from it. ``DIR/encoder.pt`` is a medclass checkpoint whose card has
``kind: encoder``, the method, the data fingerprint, the number of images and the
epochs; ``medclass train --init DIR/encoder.pt`` starts a classifier from it and
``medclass predict`` refuses it (it has no trained head).
"""

from __future__ import annotations

import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from medclass.errors import MedClassError

log = logging.getLogger(__name__)

METHODS = ("simclr",)
MIN_IMAGES = 50
STATE_FILE = "pretrain_state.pt"
ENCODER_FILE = "encoder.pt"
# Settings that must match for a re-run to continue a saved state.
_RESUME_KEYS = ("model", "method", "image_size", "channels", "normalize", "projection_dim", "model_args")


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; the CLI flags map one to one."""

    data: str
    model: str = "resnet18"
    out: str = "runs/encoder"
    method: str = "simclr"
    image_size: int = 64
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.2
    projection_dim: int = 128
    channels: int = 1
    normalize: str = "minmax"
    max_minutes: float | None = None
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    model_args: dict[str, Any] = field(default_factory=dict)

    def preprocess_spec(self) -> dict[str, Any]:
        from medclass.training import TrainConfig

        return TrainConfig(data=self.data, image_size=self.image_size, channels=self.channels,
                           normalize=self.normalize).preprocess_spec()


@dataclass
class PretrainResult:
    encoder: Path
    epochs: int
    images: int
    images_per_second: float
    history: list[dict[str, float]]


def two_views(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented views of a batch of 2D images ``(B, C, H, W)`` in [0, 1]-ish range."""
    return simclr_augment(x, generator), simclr_augment(x, generator)


def simclr_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """SimCLR's augmentations for grey medical images, on the batch tensor.

    Random resized crop (8-100 % of the area, aspect 3:4-4:3), rotation within 20
    degrees and a left-right flip in one affine resampling; then brightness, contrast and
    gamma jitter, a 3x3 blur for half the images and Gaussian noise. Colour jitter and
    grey-scale conversion, SimCLR's strongest cues on photographs, have no meaning here.
    """
    b, dev = x.shape[0], x.device

    def u(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(b, generator=generator)).to(dev)

    area = u(0.25, 1.0)
    log_ratio = u(math.log(3 / 4), math.log(4 / 3))
    sx = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    sy = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    angle = u(-20, 20) * math.pi / 180
    flip = torch.where(u(0, 1) < 0.5, -1.0, 1.0)
    tx, ty = u(-1, 1) * (1 - sx), u(-1, 1) * (1 - sy)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx * flip, -sin * sy, tx], 1),
                         torch.stack([sin * sx * flip, cos * sy, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    shape = (b,) + (1,) * (x.dim() - 1)
    mean = v.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    v = (v - mean) * u(0.6, 1.4).view(shape) + mean + u(-0.2, 0.2).view(shape)
    v = v.clamp(min=0).pow(u(0.7, 1.4).view(shape))
    blur = (u(0, 1) < 0.5).view(shape)
    v = torch.where(blur, F.avg_pool2d(v, 3, stride=1, padding=1, count_include_pad=False), v)
    noise = torch.randn(v.shape, generator=generator).to(dev)
    return v + noise * u(0, 0.05).view(shape)


class Projector(nn.Module):
    """SimCLR's projection head: Linear - BatchNorm - ReLU - Linear."""

    def __init__(self, features: int, dim: int = 128, hidden: int = 512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def _lr_at(cfg: PretrainConfig, epoch: int) -> float:
    # One warm-up epoch, then cosine to 1 % over cfg.epochs: computed from the epoch number,
    # so that a resumed run (possibly with more epochs) needs no scheduler state.
    if epoch == 0:
        return cfg.lr * 0.1
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(epoch, cfg.epochs) / max(cfg.epochs, 1))))


def _encoder_train_mode(model: nn.Module) -> None:
    model.train()
    for m in model.modules():  # the classifier's dropout only blurs the contrastive signal
        if isinstance(m, nn.Dropout):
            m.eval()


def pretrain(cfg: PretrainConfig, on_epoch: Callable[[dict[str, float]], None] | None = None) -> PretrainResult:
    """Pretrain ``cfg.model``'s encoder on the images of ``cfg.data`` and write ``DIR/encoder.pt``.

    Raises
    ------
    MedClassError
        Unknown method, a model without an encoder/head split, fewer than
        :data:`MIN_IMAGES` readable images, or a saved state from other settings.
    """
    from monai.losses import ContrastiveLoss

    from medclass.checkpoint import make_card, resolve_device, save_checkpoint
    from medclass.data.unlabelled import load_unlabelled
    from medclass.models import create_model, model_info
    from medclass.tasks import Task

    if cfg.method not in METHODS:
        raise MedClassError(f"unknown pretraining method {cfg.method!r}", f"use one of {', '.join(METHODS)}")
    info = model_info(cfg.model)
    if info.family == "classic" or info.input_kind != "image" or 2 not in info.spatial_dims:
        raise MedClassError(f"model {cfg.model} cannot be pretrained on 2D images",
                            "use a cnn or attention model (medclass models)")
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    spec = cfg.preprocess_spec()
    images = load_unlabelled(cfg.data, spec, progress=cfg.progress)
    n = len(images)
    if n < MIN_IMAGES:
        raise MedClassError(f"only {n} readable image(s) in {cfg.data}: self-supervised pretraining needs at "
                            f"least {MIN_IMAGES}", "add unlabelled images, or start from ImageNet weights "
                            "(--model efficientnet-lite0 --init imagenet)")
    torch.manual_seed(cfg.seed)
    model_args = {"spatial_dims": 2, "in_channels": int(images.x.shape[1]), "num_outputs": 2,
                  "image_size": cfg.image_size, **cfg.model_args}
    model = create_model(cfg.model, **model_args).to(device)
    with torch.no_grad():
        features = int(model.forward_features(images.x[:2].to(device)).shape[1])
    projector = Projector(features, cfg.projection_dim).to(device)
    params = [p for name, p in model.named_parameters() if not name.startswith("head.")]
    opt = torch.optim.AdamW(params + list(projector.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    criterion = ContrastiveLoss(temperature=cfg.temperature)
    gen = torch.Generator().manual_seed(cfg.seed)
    settings = {k: v for k, v in asdict(cfg).items() if k != "progress"}
    epoch, history, seconds, seen = 0, [], 0.0, 0
    state_path = out / STATE_FILE
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        old = state["config"]
        differ = [k for k in _RESUME_KEYS if old.get(k) != settings.get(k)]
        if state.get("fingerprint") != images.fingerprint:
            differ.append("data")
        if differ:
            raise MedClassError(f"{state_path} was saved by a run with other {', '.join(differ)}",
                                "use another --out, or delete that file to start over")
        model.load_state_dict(state["model"])
        projector.load_state_dict(state["projector"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        epoch, history, seconds, seen = state["epoch"], state["history"], state["seconds"], state["images_seen"]
        log.info("resuming %s from epoch %d of %d", state_path, epoch, cfg.epochs)

    def save_state() -> None:
        out.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        torch.save({"config": settings, "fingerprint": images.fingerprint, "epoch": epoch, "history": history,
                    "seconds": seconds, "images_seen": seen, "model": model.state_dict(),
                    "projector": projector.state_dict(), "optimizer": opt.state_dict(),
                    "generator": gen.get_state()}, tmp)
        tmp.replace(state_path)  # atomic: Ctrl-C while saving leaves the previous state

    def write_encoder() -> Path:
        placeholder = Task("binary", ["-", "+"])  # an encoder predicts nothing; the card says so below
        ips = seen / seconds if seconds else 0.0
        training = {
            "method": cfg.method, "epochs": epoch, "images_seen": seen, "seconds": round(seconds, 1),
            "images_per_second": round(ips, 1), "device": str(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "config": settings,
            "history": history,
        }
        data = {"spec": cfg.data, "name": images.name, "fingerprint": images.fingerprint, "n": n,
                "skipped": images.skipped_counts()}
        card = make_card(cfg.model, model_args, placeholder, spec, data=data, training=training)
        card.update(kind="encoder", task=None, pretraining={"method": cfg.method, "data_fingerprint":
                    images.fingerprint, "images": n, "epochs": epoch})
        model.eval()
        return save_checkpoint(out / ENCODER_FILE, model, card)

    deadline = time.perf_counter() + cfg.max_minutes * 60 if cfg.max_minutes else None
    bs = min(cfg.batch_size, n)
    try:
        while epoch < cfg.epochs:
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, epoch)
            _encoder_train_mode(model)
            projector.train()
            perm = torch.randperm(n, generator=gen)
            batches = range(0, n - bs + 1, bs)  # drop the last partial batch: fewer negatives, noisy loss
            if cfg.progress:
                from tqdm import tqdm

                batches = tqdm(batches, desc=f"pretrain epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
            t0, total, steps, stopped = time.perf_counter(), 0.0, 0, False
            for i in batches:
                x = images.x[perm[i:i + bs]]
                v1, v2 = two_views(x, gen)
                z = projector(model.forward_features(torch.cat([v1, v2]).to(device)))
                loss = criterion(z[:len(x)], z[len(x):])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
                steps += 1
                seen += len(x)
                if deadline and time.perf_counter() > deadline:
                    stopped = True
                    break
            dt = time.perf_counter() - t0
            seconds += dt
            if not stopped:
                epoch += 1
            record = {"epoch": epoch, "loss": total / max(steps, 1), "seconds": dt,
                      "images_per_second": steps * bs / max(dt, 1e-9), "complete": not stopped}
            history.append(record)
            log.info("pretrain epoch %d: loss %.4f, %.0f img/s", epoch, record["loss"], record["images_per_second"])
            if on_epoch:
                on_epoch(record)
            save_state()
            write_encoder()
            if stopped:
                log.warning("stopping after %d epochs: --max-minutes reached (run again to continue)", epoch)
                break
    except KeyboardInterrupt:
        save_state()  # the weights so far; a re-run repeats the unfinished epoch
        write_encoder()
        raise
    enc = out / ENCODER_FILE
    if not enc.is_file():  # a re-run of a finished run: nothing trained, the encoder is already there
        write_encoder()
    return PretrainResult(enc, epoch, n, seen / seconds if seconds else 0.0, history)


__all__ = ["METHODS", "MIN_IMAGES", "PretrainConfig", "PretrainResult", "pretrain", "simclr_augment", "two_views"]
