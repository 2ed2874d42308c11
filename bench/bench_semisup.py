"""Does semi-supervised training pay? FixMatch against labels only on Br35H, paired by seed.

Usage::

    python bench/bench_semisup.py                    # the recorded settings (5 seeds; resumable)
    python bench/bench_semisup.py --steps 10 --seeds 0 --out /tmp/x.json   # a smoke run

The pool is Br35H's training split (2,100 images) and the held-out set its test split
(450), medclass's split with seed 0, as in ``bench_al.py`` and ``bench_ssl.py``. Each
seed draws ``--labels`` labelled images from the pool at random; the rest of the pool
(its labels unused) is the unlabelled set. Both arms start from the same weights
(efficientnet-lite0 with the ImageNet weights of ``--init imagenet``), use the same
seed, the same labelled batches in the same order, the same optimiser and one-cycle
schedule (medclass's :func:`~medclass.training.optimiser`) and the same number of
steps; FixMatch adds, each step, ``mu`` unlabelled images per labelled one:

* a weak view (flip and shift, :func:`medclass.training.augment_batch`) gives the
  pseudo-label, kept when its softmax confidence is at least ``--threshold``;
* a strong view (RandAugment-like: two random operations of random magnitude per
  image, then Cutout) is trained on it with cross-entropy, weight ``--lambda-u``.

Labelled, weak and strong views go through the model in one batch, as in the
reference implementation (Sohn et al., 2020), so BatchNorm sees all of them. The
held-out AUC of each arm's final model is compared per seed; the figure is the
paired difference with its 95 % t-interval. Writes ``bench/results/semisup.json``
after every seed (a rerun skips the seeds already there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_result  # noqa: E402

MODEL, INIT, SIZE = "efficientnet-lite0", "imagenet", 64


# ---- strong augmentation: RandAugment-like, on the batch tensor (images in [0, 1]) ----

def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def _op_affine(x, m, g, kind):
    b = x.shape[0]
    sign = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    v = sign * m
    if kind == "rotate":  # up to 30 degrees
        a = v * math.radians(30)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    elif kind == "shear_x":
        theta[:, 0, 1] = 0.3 * v
    elif kind == "shear_y":
        theta[:, 1, 0] = 0.3 * v
    elif kind == "translate_x":  # up to 30 % of the width (grid units span 2)
        theta[:, 0, 2] = 0.6 * v
    else:
        theta[:, 1, 2] = 0.6 * v
    return _affine(x, theta)


def _bshape(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


def _op_brightness(x, m, g, _):
    sign = torch.where(torch.rand(x.shape[0], generator=g) < 0.5, -1.0, 1.0)
    return (x + _bshape(0.3 * sign * m, x)).clamp(0, 1)


def _op_contrast(x, m, g, _):
    sign = torch.where(torch.rand(x.shape[0], generator=g) < 0.5, -1.0, 1.0)
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return ((x - mean) * _bshape(1 + 0.9 * sign * m, x) + mean).clamp(0, 1)


def _op_gamma(x, m, g, _):
    sign = torch.where(torch.rand(x.shape[0], generator=g) < 0.5, -1.0, 1.0)
    return x.clamp(0, 1) ** _bshape(torch.exp(sign * m * math.log(2.5)), x)


def _op_solarize(x, m, g, _):
    t = _bshape(1 - m, x)
    return torch.where(x >= t, 1 - x, x)


def _op_posterize(x, m, g, _):
    levels = _bshape(2 ** (8 - (m * 6).round()), x)  # 256 down to 4 grey levels
    return (x * (levels - 1)).round() / (levels - 1)


def _op_sharpness(x, m, g, _):
    k = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.view(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1),
                       groups=x.shape[1])
    sign = torch.where(torch.rand(x.shape[0], generator=g) < 0.5, -1.0, 1.0)
    f = _bshape(1 + 0.9 * sign * m, x)  # < 1 blurs, > 1 sharpens
    return (blurred + f * (x - blurred)).clamp(0, 1)


def _op_autocontrast(x, m, g, _):
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo).clamp(min=1e-6)


def _op_noise(x, m, g, _):
    return (x + _bshape(0.1 * m, x) * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _op_identity(x, m, g, _):
    return x


OPS = [(_op_identity, None), (_op_autocontrast, None), (_op_brightness, None), (_op_contrast, None),
       (_op_gamma, None), (_op_solarize, None), (_op_posterize, None), (_op_sharpness, None), (_op_noise, None),
       (_op_affine, "rotate"), (_op_affine, "shear_x"), (_op_affine, "shear_y"), (_op_affine, "translate_x"),
       (_op_affine, "translate_y")]


def strong_augment(x: torch.Tensor, g: torch.Generator, n_ops: int = 2, cutout: float = 0.5) -> torch.Tensor:
    """RandAugment-like strong view of a batch ``(B, C, H, W)`` in [0, 1].

    Each image gets ``n_ops`` operations drawn at random from :data:`OPS`, each with a
    magnitude drawn uniformly in (0, 1] (FixMatch's RandAugment variant samples the
    magnitude too), then a Cutout square of side up to ``cutout`` of the image filled
    with grey 0.5. Every operation runs on the whole batch and is kept where the image
    drew it, which is cheap at these sizes and avoids a Python loop per image.
    """
    b = x.shape[0]
    for _ in range(n_ops):
        choice = torch.randint(len(OPS), (b,), generator=g)
        m = torch.rand(b, generator=g)
        out = x.clone()
        for k, (fn, kind) in enumerate(OPS):
            sel = choice == k
            if sel.any():
                out[sel] = fn(x[sel], m[sel], g, kind)
        x = out
    h, w = x.shape[-2:]
    side = (torch.rand(b, generator=g) * cutout * min(h, w)).long().clamp(min=1)
    cy, cx = torch.randint(h, (b,), generator=g), torch.randint(w, (b,), generator=g)
    yy = torch.arange(h).view(1, h, 1)
    xx = torch.arange(w).view(1, 1, w)
    box = ((yy - cy.view(b, 1, 1)).abs() <= side.view(b, 1, 1) // 2) & \
          ((xx - cx.view(b, 1, 1)).abs() <= side.view(b, 1, 1) // 2)
    return torch.where(box.unsqueeze(1), torch.full_like(x, 0.5), x)


def fixmatch_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor,
                  threshold: float) -> tuple[torch.Tensor, float]:
    """FixMatch's unlabelled loss: cross-entropy of the strong view on the confident weak view's argmax.

    Returns the loss (mean over all unlabelled images, masked ones counting zero, as in
    the paper) and the fraction of images above the threshold.
    """
    probs = torch.softmax(logits_weak.detach().float(), dim=1)
    conf, pseudo = probs.max(dim=1)
    mask = (conf >= threshold).float()
    loss = (F.cross_entropy(logits_strong.float(), pseudo, reduction="none") * mask).mean()
    return loss, float(mask.mean())


# ---- one arm ----

def run_arm(method: str, seed: int, pool, test, labelled: np.ndarray, unlabelled: np.ndarray, a) -> dict:
    from sklearn.metrics import roc_auc_score

    from medclass.models import create_model
    from medclass.tasks import Task
    from medclass.training import augment_batch, optimiser
    from medclass.transfer import load_init

    torch.manual_seed(seed)
    model = create_model(MODEL, image_size=SIZE, num_outputs=2)
    load_init(model, INIT)
    model = model.to(memory_format=torch.channels_last)
    task = Task(type="binary", classes=["no", "yes"])
    ylab = pool.y[labelled]
    criterion = task.loss(task.class_weights(ylab.numpy()))
    opt, sched = optimiser(model, a.lr, 1e-4, a.steps)
    # Two generators: the labelled stream (batches and their weak views) is drawn from
    # its own generator, so both arms see exactly the same labelled batches.
    g_lab = torch.Generator().manual_seed(seed)
    g_unl = torch.Generator().manual_seed(10_000 + seed)
    xl_all, xu_all = pool.x[labelled], pool.x[unlabelled]
    order_l = torch.randperm(len(labelled), generator=g_lab)
    order_u = torch.randperm(len(unlabelled), generator=g_unl)
    pl, pu = 0, 0
    history = []
    t0 = time.perf_counter()
    model.train()
    for step in range(a.steps):
        if pl + a.batch > len(order_l):
            order_l, pl = torch.randperm(len(labelled), generator=g_lab), 0
        idx = order_l[pl:pl + a.batch]
        pl += a.batch
        xl = augment_batch(xl_all[idx], g_lab)
        yl = ylab[idx]
        if method == "labels-only":
            logits = model(xl.contiguous(memory_format=torch.channels_last)).float()
            loss_x, loss_u, mask = criterion(logits, yl), torch.zeros(()), 0.0
            loss = loss_x
        else:
            nu = a.mu * a.batch
            if pu + nu > len(order_u):
                order_u, pu = torch.randperm(len(unlabelled), generator=g_unl), 0
            iu = order_u[pu:pu + nu]
            pu += nu
            xu = xu_all[iu]
            weak = augment_batch(xu, g_unl)
            strong = strong_augment(augment_batch(xu, g_unl), g_unl)
            x = torch.cat([xl, weak, strong]).contiguous(memory_format=torch.channels_last)
            logits = model(x).float()
            lx, lw, ls = logits[:len(xl)], logits[len(xl):len(xl) + nu], logits[len(xl) + nu:]
            loss_x = criterion(lx, yl)
            loss_u, mask = fixmatch_loss(lw, ls, a.threshold)
            loss = loss_x + a.lambda_u * loss_u
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched.last_epoch < sched.total_steps - 1:
            sched.step()
        if step % 10 == 0 or step == a.steps - 1:
            history.append({"step": step, "loss_x": round(loss_x.item(), 4), "loss_u": round(loss_u.item(), 4),
                            "mask": round(mask, 3)})
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(test.x[i:i + 150].contiguous(memory_format=torch.channels_last))
                                         .float(), 1) for i in range(0, len(test), 150)])
    auc = float(roc_auc_score(test.y.numpy(), probs[:, 1].numpy()))
    acc = float((probs.argmax(1) == test.y).float().mean())
    return {"auc": auc, "accuracy": acc, "train_seconds": round(train_s, 1), "history": history}


def t_interval(values: list[float]) -> dict:
    """Mean and 95 % t-interval (two-sided) of a few paired values."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None,
            "lo": float(v.mean() - half), "hi": float(v.mean() + half), "n": int(len(v))}


def summarise(per_seed: dict) -> dict:
    seeds = sorted(per_seed, key=int)
    base = [per_seed[s]["labels-only"]["auc"] for s in seeds]
    fm = [per_seed[s]["fixmatch"]["auc"] for s in seeds]
    diff = [f - b for f, b in zip(fm, base)]
    return {"labels_only": t_interval(base), "fixmatch": t_interval(fm), "difference": t_interval(diff),
            "fixmatch_better_seeds": int(sum(d > 0 for d in diff)), "seeds": len(seeds)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--labels", type=int, default=100)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=32, help="labelled images per step")
    p.add_argument("--mu", type=int, default=2, help="unlabelled images per labelled image in a step")
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--lambda-u", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a CPU others are using too")
    p.add_argument("--out", default=None, help="results file (default bench/results/semisup.json)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from medclass.data import load_dataset, materialize, split_samples
    from medclass.training import TrainConfig

    out = Path(a.out) if a.out else RESULTS / "semisup.json"
    settings = {"model": MODEL, "init": INIT, "image_size": SIZE, "labels": a.labels, "steps": a.steps,
                "batch": a.batch, "mu": a.mu, "threshold": a.threshold, "lambda_u": a.lambda_u, "lr": a.lr,
                "weight_decay": 1e-4, "threads": a.threads, "schedule": "AdamW, one-cycle (pct_start 0.15)",
                "weak": "flip + shift + contrast jitter (medclass.training.augment_batch)",
                "strong": "weak, then 2 RandAugment-like ops of random magnitude per image, then Cutout (side "
                          "up to half the image)"}
    prev = json.loads(out.read_text()) if out.is_file() else {}
    per_seed = prev.get("per_seed", {}) if prev.get("settings") == settings else {}
    load = [os.getloadavg()[0]]
    ds = load_dataset("br35h")
    splits = split_samples(ds, 0)
    spec = TrainConfig(data="br35h", image_size=SIZE).preprocess_spec()
    pool, test = materialize(ds, splits["train"], spec), materialize(ds, splits["test"], spec)
    print(f"pool {len(pool)}, test {len(test)}, x range {float(pool.x.min()):.2f}..{float(pool.x.max()):.2f}",
          flush=True)
    t_all = time.perf_counter()
    for seed in a.seeds:
        if str(seed) in per_seed:
            continue
        perm = np.random.default_rng(seed).permutation(len(pool))
        labelled, unlabelled = perm[:a.labels], perm[a.labels:]
        entry = {"labelled_positives": int(pool.y[labelled].sum())}
        for method in ("labels-only", "fixmatch"):
            entry[method] = run_arm(method, seed, pool, test, labelled, unlabelled, a)
            print(seed, method, {k: v for k, v in entry[method].items() if k != "history"},
                  "final", entry[method]["history"][-1], flush=True)
        entry["difference"] = entry["fixmatch"]["auc"] - entry["labels-only"]["auc"]
        per_seed[str(seed)] = entry
        load.append(os.getloadavg()[0])
        payload = {"settings": settings, "pool": len(pool), "test": len(test), "per_seed": per_seed,
                   "summary": summarise(per_seed), "command": "python bench/bench_semisup.py " + " ".join(argv or
                                                                                               sys.argv[1:]),
                   "conditions": f"load average (1 min) {min(load):.1f}–{max(load):.1f} during the run on "
                                 f"{os.cpu_count()} cores shared with other work",
                   "wall_seconds_this_call": round(time.perf_counter() - t_all, 1)}
        if a.out:
            from common import machine

            out.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
        else:
            write_result("semisup", payload)
    if per_seed:
        print(json.dumps(summarise(per_seed), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
