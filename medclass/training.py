"""Training: one implementation for the CLI, the MONAI Label trainer and
``torchrun`` (DDP).

Deterministic split (seed), class weighting, early stopping on validation AUC,
bf16 autocast on GPU, optional ``channels_last`` and ``torch.compile``; writes
``model.pt`` (weights + model card) and ``metrics.json`` (held-out metrics and
plots) to the output folder.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from medclass.checkpoint import LoadedModel, make_card, resolve_device, save_checkpoint
from medclass.data import LabelledSet, TensorSet, load_dataset, materialize, split_samples
from medclass.data.scope import codes
from medclass.errors import MedClassError
from medclass.inference import autocast, forward_probabilities
from medclass.models import count_parameters, create_model, model_info

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything a training run needs; the CLI flags map one to one."""

    data: str
    model: str = "resnet18"
    out: str = "runs/model"
    image_size: int = 64
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 3
    device: str = "auto"
    seed: int = 0
    task: str | None = None
    spatial_dims: int = 2
    depth: int = 16
    channels: int = 1
    denoise: str | None = None
    enhance: str | None = None
    crop_foreground: bool = False
    normalize: str = "minmax"
    augment: bool = True
    channels_last: bool | None = None  # None: on for 2D CNNs, where it is ~25 % faster even on CPU
    compile: bool = False
    max_minutes: float | None = None  # stop after this many minutes (keeps the best epoch)
    limit: int | None = None  # use only this many training images (smoke tests)
    aggregation: str = "mean"
    # What the images are (DICOM codes, e.g. "MR" / "BRAIN", "CR,DX" / "CHEST"), when the data does not say
    # or says it wrongly; recorded in the card so that the node classifies only such series.
    modality: str | None = None
    body_part: str | None = None
    progress: bool = True
    # Initial weights (medclass.transfer.load_init): an encoder from 'medclass pretrain', a
    # model.pt, a state dict, or a name the model offers ("imagenet" for efficientnet-lite0).
    init: str | None = None
    freeze_encoder: bool = False  # linear probe: only the head (parameters "head.*") trains
    model_args: dict[str, Any] = field(default_factory=dict)

    def preprocess_spec(self) -> dict[str, Any]:
        return {
            "spatial_dims": self.spatial_dims,
            "image_size": self.image_size,
            "depth": self.depth,
            "channels": self.channels,
            "window": None,
            "denoise": self.denoise,
            "enhance": self.enhance,
            "crop_foreground": self.crop_foreground,
            "normalize": self.normalize,
        }


@dataclass
class TrainResult:
    checkpoint: Path
    metrics: dict[str, Any]
    history: list[dict[str, float]]


def _ddp_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) under torchrun, else (0, 0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Cheap batch-level augmentation: flips, shifts, contrast jitter.

    Done on the batch tensor (not per sample in Python) so it costs little on
    CPU. Left-right flips are safe for classification without laterality.
    """
    b = x.shape[0]
    dev = x.device
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip.to(dev).view(b, *([1] * (x.dim() - 1))), x.flip(-1), x)
    s = x.shape[-1]
    dy, dx = (torch.randint(-s // 10, s // 10 + 1, (2,), generator=generator)).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    gain = (1 + 0.2 * (torch.rand(b, generator=generator) - 0.5)).to(dev).view(b, *([1] * (x.dim() - 1)))
    return x * gain


def _selection_score(task_type: str, y: np.ndarray, probs: np.ndarray, classes: list[str]) -> float:
    from medclass.metrics import compute_metrics

    m = compute_metrics(task_type, y, probs, classes)
    if task_type == "ordinal" and m.get("qwk") is not None:
        return float(m["qwk"])
    return float(m["auc"]) if m.get("auc") is not None else float(m["accuracy"])


def train(cfg: TrainConfig, ds: LabelledSet | None = None,
          on_epoch: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` and write the checkpoint and metrics.

    Parameters
    ----------
    cfg : TrainConfig
        The run's settings.
    ds : LabelledSet, optional
        An already loaded dataset (the MONAI Label trainer passes its own);
        otherwise ``cfg.data`` is resolved with :func:`~medclass.data.load_dataset`.
    on_epoch : callable, optional
        Called with each epoch's record (for progress reporting).
    """
    rank, local_rank, world = _ddp_env()
    distributed = world > 1
    if distributed:
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        device = resolve_device(cfg.device)
    is_main = rank == 0
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    info = model_info(cfg.model)
    if cfg.init and Path(cfg.init).is_file():
        from medclass.transfer import read_weights

        read_weights(cfg.init)  # a file that is not weights fails now, not after reading the data
    ds = ds or load_dataset(cfg.data, cfg.task)
    task = ds.task
    splits = split_samples(ds, cfg.seed)
    if cfg.limit and cfg.limit < len(splits["train"]):
        # A seeded random subset: the split's indices are sorted, i.e. grouped by class.
        keep = np.random.default_rng(cfg.seed).permutation(len(splits["train"]))[: cfg.limit]
        splits["train"] = sorted(splits["train"][i] for i in keep)
    if not splits["train"]:
        raise MedClassError(f"{ds.name} is too small to split", "add images")
    spec = cfg.preprocess_spec()
    multimodal = info.family == "crossmodal"
    t0 = time.perf_counter()
    sets: dict[str, TensorSet] = {}
    for part in ("train", "val", "test"):
        if splits[part]:
            sets[part] = materialize(ds, splits[part], spec, multimodal, progress=cfg.progress and is_main)
    if "val" not in sets:
        log.warning("%s is too small for a validation split: early stopping uses the training set", ds.name)
        sets["val"] = sets["train"]
    if "test" not in sets:
        log.warning("%s is too small for a test split: test metrics are computed on the validation set",
                    ds.name)
        sets["test"] = sets["val"]
    load_s = time.perf_counter() - t0
    train_set = sets["train"]
    in_channels = int(train_set.x.shape[1])
    model_args = {"spatial_dims": cfg.spatial_dims, "in_channels": in_channels,
                  "num_outputs": task.num_outputs, "image_size": cfg.image_size,
                  **_init_model_args(cfg), **cfg.model_args}
    card_data = {
        "spec": cfg.data, "name": ds.name, "fingerprint": ds.fingerprint, "n": len(ds),
        "split_seed": cfg.seed, "n_train": len(train_set), "n_val": len(sets["val"]), "n_test": len(sets["test"]),
        "val_keys": sets["val"].keys, "test_keys": sets["test"].keys,
        "skipped": sum(len(s.skipped) for s in sets.values()),
        "modality": codes(cfg.modality) or ds.modality, "body_part": codes(cfg.body_part) or ds.body_part,
    }
    model = create_model(cfg.model, **model_args)
    init_report = _initialise(model, cfg)
    history: list[dict[str, float]] = []
    t1 = time.perf_counter()
    if isinstance(model, nn.Module):
        model, history = _fit_torch(model, cfg, task, sets, device, distributed, is_main, on_epoch)
    else:
        model.fit(train_set.x.numpy(), train_set.y.numpy())
    train_s = time.perf_counter() - t1
    result_metrics: dict[str, Any] = {}
    ckpt = Path(cfg.out) / "model.pt"
    if is_main:
        from medclass.calibration import calibration_summary
        from medclass.evaluation import calibrate_model
        from medclass.metrics import evaluation_report

        # Calibration (medclass.calibration) is fitted on the validation split before the held-out
        # metrics, so that they, and every front door, see the calibrated probabilities.
        calibration = calibrate_model(LoadedModel(model, {}, task, device), sets["val"],
                                      sets["test"] if sets["test"] is not sets["val"] else None)
        log.info("%s", calibration_summary(calibration))
        loaded = LoadedModel(model, {"calibration": calibration}, task, device)
        probs = forward_probabilities(loaded, sets["test"].x, sets["test"].extra())
        out_dir = Path(cfg.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        result_metrics = evaluation_report(task.type, sets["test"].y.numpy(), probs, task.classes, out_dir,
                                           seed=cfg.seed)
        result_metrics.update(split="test", checkpoint="model.pt", model=cfg.model)
        training = {
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("progress",)},
            "epochs_run": len(history), "best_epoch": _best_epoch(history),
            "load_seconds": round(load_s, 2), "train_seconds": round(train_s, 2),
            "train_images_per_second": round(len(train_set) * max(1, len(history)) / max(train_s, 1e-9), 1),
            "device": str(device), "world_size": world, "parameters": count_parameters(model),
            "torch": torch.__version__, "python": platform.python_version(), "history": history,
        }
        if init_report is not None:
            training["init"] = init_report.as_card()
        if cfg.freeze_encoder:
            training["trained_parameters"] = "head"
        card = make_card(cfg.model, model_args, task, spec, ds.class_codes, card_data,
                         {k: v for k, v in result_metrics.items() if k not in ("per_class", "per_label")},
                         training, cfg.aggregation)
        card["calibration"] = calibration
        result_metrics["calibration"] = {k: v for k, v in calibration.items() if k not in ("roc", "conformal")}
        save_checkpoint(ckpt, model, card)
        result_metrics["training"] = {k: v for k, v in training.items() if k != "config"}
        (out_dir / "metrics.json").write_text(json.dumps(result_metrics, indent=2))
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(ckpt, result_metrics, history)


def _init_model_args(cfg: TrainConfig) -> dict[str, Any]:
    """Builder arguments (e.g. ``width``) of an ``--init`` checkpoint of the same model, so that
    ``--init encoder.pt`` builds the architecture the encoder was trained as."""
    if not cfg.init or not Path(cfg.init).is_file():
        return {}
    from medclass.checkpoint import read_card

    try:
        card = read_card(cfg.init)
    except MedClassError:  # a plain state dict: the model's defaults
        return {}
    if card["model"]["name"] != cfg.model:
        return {}
    fixed = ("spatial_dims", "in_channels", "num_outputs", "image_size")
    return {k: v for k, v in card["model"]["args"].items() if k not in fixed}


def _initialise(model: Any, cfg: TrainConfig):
    """Apply ``cfg.init`` and ``cfg.freeze_encoder``; returns the :class:`~medclass.transfer.InitReport`."""
    from medclass.transfer import freeze_encoder, load_init

    report = None
    if cfg.init:
        report = load_init(model, cfg.init)
        log.info("%s", report.summary())
    if cfg.freeze_encoder:
        if not cfg.init:
            log.warning("--freeze-encoder without --init: the head trains on a randomly initialised encoder")
        freeze_encoder(model)
    return report


def _best_epoch(history: list[dict[str, float]]) -> int | None:
    if not history:
        return None
    return int(max(history, key=lambda h: h["val_score"])["epoch"])


def optimiser(model: nn.Module, lr: float, weight_decay: float,
              total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW with a one-cycle learning-rate schedule over ``total_steps`` (the recipe of every medclass fit)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, total_steps), pct_start=0.15)
    return opt, sched


def train_step(net: nn.Module, xb: torch.Tensor, yb: torch.Tensor, criterion: nn.Module,
               opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.OneCycleLR, device: torch.device, *,
               generator: torch.Generator | None = None, channels_last: bool = False,
               extra: dict[str, torch.Tensor] | None = None) -> float:
    """One optimisation step on a batch; returns its loss.

    Augments the batch on the CPU when ``generator`` is given (:func:`augment_batch`),
    moves it to ``device`` (channels-last for 2D CNNs), runs forward under autocast,
    steps the optimiser and the schedule (never past the schedule's last step).
    """
    if generator is not None:
        xb = augment_batch(xb, generator)
    xb = xb.to(device, non_blocking=True)
    if channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    extra = {k: v.to(device) for k, v in (extra or {}).items()}
    with autocast(device):
        loss = criterion(net(xb, **extra).float(), yb.to(device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if sched.last_epoch < sched.total_steps - 1:
        sched.step()
    return loss.item()


def _fit_torch(model: nn.Module, cfg: TrainConfig, task, sets: dict[str, TensorSet], device: torch.device,
               distributed: bool, is_main: bool, on_epoch) -> tuple[nn.Module, list[dict[str, float]]]:
    train_set, val_set = sets["train"], sets["val"]
    model.to(device)
    channels_last = cfg.channels_last
    if channels_last is None:
        channels_last = model_info(cfg.model).family == "cnn"
    channels_last = channels_last and train_set.x.dim() == 4
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    weights = task.class_weights(train_set.y.numpy()).to(device)
    criterion = task.loss(weights).to(device)
    rank, _, world = _ddp_env()
    n = len(train_set)
    steps_per_epoch = max(1, math.ceil(n / world / cfg.batch_size))
    opt, sched = optimiser(model, cfg.lr, cfg.weight_decay, cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    best_score, best_state, stale = -math.inf, None, 0
    history: list[dict[str, float]] = []
    deadline = time.perf_counter() + cfg.max_minutes * 60 if cfg.max_minutes else None
    val_loaded = LoadedModel(model, {}, task, device)
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        if cfg.freeze_encoder:
            from medclass.transfer import encoder_eval

            encoder_eval(model)  # a linear probe keeps the encoder's BatchNorm statistics
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)[rank::world]
        batches = range(0, len(perm), cfg.batch_size)
        if cfg.progress and is_main:
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False)
        total, seen = 0.0, 0
        for i in batches:
            idx = perm[i : i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a batch of one
                continue
            loss = train_step(net, train_set.x[idx], train_set.y[idx], criterion, opt, sched, device,
                              generator=gen if cfg.augment else None, channels_last=channels_last,
                              extra=train_set.extra(idx))
            total += loss * len(idx)
            seen += len(idx)
        train_s = time.perf_counter() - t0
        record = {"epoch": epoch, "train_loss": total / max(seen, 1),
                  "train_images_per_second": seen / max(train_s, 1e-9), "seconds": train_s}
        model.eval()
        probs = forward_probabilities(val_loaded, val_set.x, val_set.extra())
        record["val_score"] = _selection_score(task.type, val_set.y.numpy(), probs, task.classes)
        history.append(record)
        if is_main:
            log.info("epoch %d: loss %.4f, val %.4f, %.0f img/s", epoch, record["train_loss"],
                     record["val_score"], record["train_images_per_second"])
            if on_epoch:
                on_epoch(record)
        if record["val_score"] > best_score:
            best_score, stale = record["val_score"], 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= cfg.patience:
                break
        if deadline and time.perf_counter() > deadline:
            log.warning("stopping after %d epochs: --max-minutes reached", epoch)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, history


__all__ = ["TrainConfig", "TrainResult", "augment_batch", "train"]
