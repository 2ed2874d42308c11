"""The ``medclass`` command line.

``main(args=None)`` so that tests pass argument lists. A user mistake
(:class:`~medclass.errors.MedClassError`) prints one line and exits 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable

from medclass import __version__
from medclass.errors import MedClassError
from medclass.paths import quickstart_dir

#: Sub-commands that other packages add (``medclass node`` comes from the DICOM node's
#: package), found through this entry-point group so that the core never imports a front door.
PLUGIN_GROUP = "medclass.commands"


def plugin_command(name: str) -> Callable[[list[str]], int] | None:
    """The ``main(argv)`` of the sub-command ``name`` registered in :data:`PLUGIN_GROUP`, or ``None``."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.name == name:
            return ep.load()
    return None


_NODE_MISSING = ("the DICOM node is not installed",
                 "install it with the node extra from the project folder: pip install -e '.[node]' (or make install)")


def _cmd_models(a) -> int:
    from medclass.models import count_parameters, create_model, list_models, model_info

    rows = []
    for name in list_models(a.family):
        info = model_info(name)
        m = create_model(name, spatial_dims=2 if 2 in info.spatial_dims else 3)
        rows.append({**info.as_dict(), "parameters": count_parameters(m)})
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<18}{'family':<12}{'dims':<7}{'params (2D)':>12}  description")
    for r in rows:
        dims = ",".join(f"{d}D" for d in r["spatial_dims"])
        params = f"{r['parameters']:,}" if r["family"] != "classic" else "-"
        print(f"{r['name']:<18}{r['family']:<12}{dims:<7}{params:>12}  {r['description']}")
    return 0


def _cmd_datasets(a) -> int:
    from medclass.data import list_datasets

    rows = list_datasets()
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        if r["available"]:
            print(f"{r['name']:<17}{r['n']:>6} images  {r['task']:<10} {', '.join(r['classes'])}")
            print(f"{'':<17}{r['description']}")
        else:
            print(f"{r['name']:<17}not installed: {r['error']}")
    print("\n--data also accepts: a folder with one sub-folder per class; a CSV manifest (path,label[,patient_id,"
          "text,age,sex,laterality,view]); a MedMNIST .npz; a folder of DICOM files with labels.csv "
          "(sop_uid|series_uid|study_uid|patient_id,label).")
    return 0


def _train_config(a):
    from medclass.training import TrainConfig

    return TrainConfig(
        data=a.data, model=a.model, out=a.out, image_size=a.image_size, epochs=a.epochs,
        batch_size=a.batch_size, lr=a.lr, patience=a.patience, device=a.device, seed=a.seed,
        task=a.task, spatial_dims=a.spatial_dims, depth=a.depth, channels=a.channels, denoise=a.denoise,
        enhance=a.enhance, crop_foreground=a.crop_foreground, augment=not a.no_augment,
        channels_last=a.channels_last, compile=a.compile, max_minutes=a.max_minutes, limit=a.limit,
        aggregation=a.aggregation, progress=not a.quiet, init=a.init, freeze_encoder=a.freeze_encoder,
        modality=a.modality, body_part=a.body_part,
    )


def _cmd_train(a) -> int:
    from medclass.metrics import format_metrics
    from medclass.training import train

    res = train(_train_config(a))
    if res.metrics:
        print(format_metrics(res.metrics))
        print(f"wrote {res.checkpoint} and {Path(a.out) / 'metrics.json'}")
    return 0


def _cmd_pretrain(a) -> int:
    from medclass.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(data=a.data, model=a.model, out=a.out, method=a.method, image_size=a.image_size,
                         epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, max_minutes=a.max_minutes,
                         device=a.device, seed=a.seed, progress=not a.quiet)
    res = pretrain(cfg)
    print(f"wrote {res.encoder}: {cfg.method} on {res.images} images, {res.epochs}/{cfg.epochs} epochs, "
          f"{res.images_per_second:.0f} images/s")
    if res.epochs < cfg.epochs:
        print("run the same command again to continue")
    print(f"next: medclass train --data ... --model {cfg.model} --init {res.encoder} [--freeze-encoder]")
    return 0


def _cmd_evaluate(a) -> int:
    from medclass.evaluation import evaluate_checkpoint
    from medclass.metrics import format_metrics

    _need_model(a)
    use_dicom_decoder(a.dicom_decoder)
    m = evaluate_checkpoint(a.checkpoint, a.data, a.out, a.split, a.device, a.bootstrap, a.inference)
    print(format_metrics(m))
    print(f"wrote {Path(a.out) / 'metrics.json'} and plots")
    return 0


def _cmd_calibrate(a) -> int:
    from medclass.calibration import calibration_summary
    from medclass.evaluation import calibrate_checkpoint

    cal = calibrate_checkpoint(a.checkpoint, a.data, a.out, a.device)
    print(calibration_summary(cal))
    print(f"wrote {a.out or a.checkpoint}")
    return 0


def use_dicom_decoder(name: str) -> None:
    """--dicom-decoder: who decodes compressed DICOM pixel data in this process (medclass.io)."""
    from medclass.io import use_dicom_decoder as use

    use(name)


def _need_model(a) -> None:
    """A checkpoint, a remote model, or both: refuse neither."""
    if not a.checkpoint and a.inference in (None, "local"):
        raise MedClassError("no model given", "pass --checkpoint model.pt, or --inference triton://HOST:PORT/MODEL")


def _cmd_predict(a) -> int:
    from medclass.errors import InferenceUnavailable
    from medclass.inference import Classifier

    _need_model(a)
    use_dicom_decoder(a.dicom_decoder)
    clf = Classifier(a.checkpoint, a.device, inference=a.inference)
    status = 0
    for p in a.paths:
        try:
            pred = clf.predict([clf.read(p)], priority=a.priority)[0]
            pred.path = str(p)
            print(json.dumps(pred.as_dict()), flush=True)
        except InferenceUnavailable:  # the server, not the file: the files after it would fail the same way
            raise
        except MedClassError as e:  # one bad file does not stop the others
            print(json.dumps({"path": str(p), "error": str(e)}), flush=True)
            print(f"medclass: error: {e}", file=sys.stderr)
            status = 2
    return status


def _cmd_explain(a) -> int:
    from medclass.explain import explain, save_overlay
    from medclass.inference import Classifier

    clf = Classifier(a.checkpoint, a.device)
    img = clf.read(a.path)
    ex = explain(clf, img, a.target)
    save_overlay(ex, a.out, title=f"{Path(a.path).name} ({clf.loaded.name})")
    print(f"wrote {a.out} ({ex.method} for class {ex.class_name!r}, p = {ex.probability:.3f})")
    if ex.note:
        print(ex.note)
    return 0


def _cmd_export(a) -> int:
    from medclass.export import export_checkpoint

    if a.format == "triton":
        folder = export_checkpoint(a.checkpoint, "triton", a.out, model_name=a.model_name, backend=a.backend,
                                   max_batch_size=a.max_batch_size)
        print(f"wrote {folder}/config.pbtxt and {folder}/1/model.onnx (backend {a.backend}; the card rides in "
              f"config.pbtxt); serve {a.out} with tritonserver --model-repository {a.out}, then use "
              f"--inference triton://HOST:8001/{folder.name}")
        return 0
    out = export_checkpoint(a.checkpoint, a.format, a.out)
    print(f"wrote {out} and {out}.json (the model card: preprocessing and class names)")
    return 0


def _cmd_quickstart(a) -> int:
    from medclass.metrics import format_metrics
    from medclass.training import TrainConfig, train

    out = Path(a.out)
    ckpt = out / "model.pt"
    if ckpt.exists() and not a.retrain:
        from medclass.evaluation import evaluate_checkpoint

        print(f"using the existing model {ckpt} (pass --retrain to train a new one)")
        m = evaluate_checkpoint(ckpt, "br35h", out / "evaluation", "test", a.device)
    else:
        print("training resnet18 on Br35H (3,000 brain MRI, tumour yes/no) at 64 px; a few minutes on 2 CPU cores")
        cfg = TrainConfig(data="br35h", model="resnet18", out=str(out), image_size=64, epochs=a.epochs,
                          batch_size=64, device=a.device, seed=0, progress=not a.quiet)
        m = train(cfg).metrics
    print(format_metrics(m))
    exe = _command_name()
    plots = sorted({p.name: p for p in (*out.glob("*.png"), *(out / "evaluation").glob("*.png"))}.values())
    if plots:
        print("plots: " + ", ".join(str(p) for p in plots))
    print(f"""
The model is {ckpt}. Next:
  {exe} predict --checkpoint {ckpt} IMAGE.jpg|.dcm|.nii.gz ...
  {exe} explain --checkpoint {ckpt} IMAGE --out heatmap.png
  {exe} evaluate --checkpoint {ckpt} --data br35h --out {out / 'evaluation'}
  {exe} train --data DIR|manifest.csv|file.npz --model NAME --out runs/mine   ({exe} models, {exe} datasets)""")
    if a.no_node:
        return 0
    node_main = plugin_command("node")
    if node_main is None:  # the node is an extra
        print(f"\nThe DICOM node is not installed; {_NODE_MISSING[1]}.")
        return 0
    port = a.node_port
    print(f"""
Starting the DICOM triage node with this model (Ctrl-C stops it; --no-node skips this step).
Point your PACS at it: a DICOM modality with AE title MEDCLASS, this machine's address, port {port}.
In Orthanc's configuration:
  "DicomModalities" : {{ "medclass" : [ "MEDCLASS", "<this machine's address>", {port} ] }}
then send a study:  curl -X POST http://localhost:8042/modalities/medclass/store -d '{{"Resources": ["<study id>"]}}'
For the SR to come back, run the node with --return-to ORTHANC@<pacs address>:4242 (see dicom_node/README.md):
  medclass node --checkpoint {ckpt} --port {port} --return-to ORTHANC@<pacs address>:4242
""", flush=True)
    return node_main(["--checkpoint", str(ckpt), "--port", str(port)])


def _command_name() -> str:
    """How the user can type this command: ``medclass`` when it is on PATH, else its path (e.g. ``.venv/bin/medclass``)."""
    import os
    import shutil

    found = shutil.which("medclass")
    if found and Path(found).resolve().parent == Path(sys.executable).resolve().parent:
        return "medclass"
    exe = Path(sys.executable).parent / "medclass"
    try:
        return os.path.relpath(exe)
    except ValueError:  # another drive (Windows)
        return str(exe)


def _cmd_node(a) -> int:
    node_main = plugin_command("node")
    if node_main is None:
        raise MedClassError(*_NODE_MISSING)
    return node_main(a.node_args)


def _inference_argument(s) -> None:
    s.add_argument("--inference", default="local", metavar="local|triton://HOST[:PORT]/MODEL",
                   help="where the model runs: here (default) or on a Triton Inference Server serving a "
                   "repository from 'medclass export --format triton'")
    s.add_argument("--dicom-decoder", default="pydicom", choices=["pydicom", "nvimgcodec", "auto"],
                   help="who decodes compressed DICOM pixel data: pydicom (default: pylibjpeg, GDCM), "
                   "nvimgcodec (an NVIDIA GPU; pip install -e '.[gpu-decode]') or auto")


def _csv(kind):
    def parse(text: str):
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def _key_value(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _cmd_al_sim(a) -> int:
    from medclass.active import SimulationConfig, simulate

    # Flags left out keep SimulationConfig's defaults, which live in one place.
    names = ("data", "model", "image_size", "initial", "per_round", "budget", "seeds", "strategies",
             "hybrid_score", "epochs", "min_steps", "batch_size", "lr", "mc_samples", "split_seed", "target",
             "device", "threads", "init")
    given = {n: getattr(a, n) for n in names if getattr(a, n) is not None}
    if a.init:
        # On frozen embeddings a round costs a linear fit: label in small steps.
        for k, v in (("initial", 10), ("per_round", 10), ("budget", 300), ("strategies",
                     ("random", "margin", "typiclust", "typiclust+margin"))):
            given.setdefault(k, v)
    if a.model_arg is not None:
        given["model_args"] = dict(a.model_arg)
    cfg = SimulationConfig(**given)
    cfg.check()
    result = simulate(cfg)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    sm = result["summary"]
    print(f"full-data AUC {sm['full_auc_mean']:.4f} (mean of {len(result['full'])} seeds); target "
          f"{cfg.target:.0%} of it = {sm['target_auc']:.4f}; pool {result['pool']} images")
    print(f"{'strategy':<18}{'labels per seed':<24}{'mean':>8}{'of pool':>9}{'vs random':>11}")
    for name, r in sm["strategies"].items():
        per_seed = ", ".join("-" if v is None else str(v) for v in r["per_seed"].values())
        mean = "-" if r["mean"] is None else f"{r['mean']:.0f}"
        frac = "-" if r["pool_fraction"] is None else f"{r['pool_fraction']:.1%}"
        ratio = "-" if r["ratio_to_random"] is None else f"{r['ratio_to_random']:.2f}"
        print(f"{name:<18}{per_seed:<24}{mean:>8}{frac:>9}{ratio:>11}")
    print(f"('-': not reached within {cfg.budget} labels) wrote {out} in {result['wall_seconds'] / 60:.1f} min")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medclass", description="Medical image classification: train, evaluate, "
                                "predict, explain and export the shared model zoo.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more (and show tracebacks)")
    p.add_argument("--version", action="version", version=f"medclass {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help="list the registered models")
    s.add_argument("--family", choices=["cnn", "rnn", "attention", "crossmodal", "classic"])
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_models)

    s = sub.add_parser("datasets", help="list the datasets usable offline")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_datasets)

    s = sub.add_parser("train", help="train a model and write DIR/model.pt and DIR/metrics.json")
    s.add_argument("--data", required=True, help="built-in name, class folder, CSV manifest, .npz or DICOM folder")
    s.add_argument("--model", default="resnet18", help="a name from 'medclass models'")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--patience", type=int, default=3, help="early stopping: epochs without val improvement")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.add_argument("--seed", type=int, default=0, help="seeds the split and the training")
    s.add_argument("--task", choices=["auto", "binary", "multiclass", "multilabel", "ordinal"], default="auto")
    s.add_argument("--spatial-dims", type=int, choices=[2, 3], default=2)
    s.add_argument("--depth", type=int, default=16, help="slices of a 3D input")
    s.add_argument("--channels", type=int, choices=[1, 3], default=1)
    s.add_argument("--denoise", choices=["median", "gaussian"])
    s.add_argument("--enhance", choices=["histeq", "clahe"])
    s.add_argument("--crop-foreground", action="store_true")
    s.add_argument("--no-augment", action="store_true")
    s.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory layout (default: on for 2D CNNs)")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--max-minutes", type=float, help="stop training after this long, keeping the best epoch")
    s.add_argument("--limit", type=int, help="train on only this many images (smoke tests)")
    s.add_argument("--aggregation", choices=["mean", "max"], default="mean",
                   help="how a study's images combine into one result")
    s.add_argument("--modality", help="DICOM modality of the images, e.g. MR or CR,DX (default: from the DICOM "
                   "headers or the built-in dataset); the node classifies only such series")
    s.add_argument("--body-part", help="DICOM Body Part Examined of the images, e.g. BRAIN (default: as --modality)")
    s.add_argument("--init", metavar="PATH", help="start from these weights: an encoder from 'medclass pretrain', "
                   "a model.pt (another task gets a new head), a state dict of the same architecture, or a name "
                   "the model offers ('imagenet' for efficientnet-lite0)")
    s.add_argument("--freeze-encoder", action="store_true",
                   help="linear probe: train only the classifier head (the parameters 'head.*')")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=_cmd_train)

    s = sub.add_parser("pretrain", help="self-supervised pretraining on unlabelled images; writes DIR/encoder.pt",
                       description="SimCLR on any --data form (labels ignored) or a folder of images/DICOM "
                       "(nested, mixed formats; unreadable files are skipped with a count). Resumable: run the "
                       "same command again after Ctrl-C or --max-minutes.")
    s.add_argument("--data", required=True, help="a folder of images, or any --data form of 'train'")
    s.add_argument("--model", default="resnet18", help="a name from 'medclass models' (its encoder is trained)")
    s.add_argument("--out", required=True, help="output folder (encoder.pt, pretrain_state.pt)")
    s.add_argument("--method", default="simclr", choices=["simclr"])
    s.add_argument("--epochs", type=int, default=20)
    s.add_argument("--batch-size", type=int, default=128, help="images per batch (two views each)")
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--max-minutes", type=float, help="stop after this long (a re-run continues)")
    s.add_argument("--device", default="auto")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=_cmd_pretrain)

    s = sub.add_parser("evaluate", help="metrics, confidence intervals and plots on a dataset")
    s.add_argument("--checkpoint", help="model.pt (optional with --inference triton://...)")
    _inference_argument(s)
    s.add_argument("--data", help="defaults to the dataset recorded in the checkpoint")
    s.add_argument("--split", default="test", choices=["test", "val", "all"],
                   help="test/val: the held-out split recorded in the checkpoint")
    s.add_argument("--out", required=True)
    s.add_argument("--device", default="auto")
    s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    s.set_defaults(fn=_cmd_evaluate)

    s = sub.add_parser("calibrate", help="(re)fit calibration, operating points and conformal sets on the "
                       "checkpoint's validation split")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--data", help="defaults to the dataset recorded in the checkpoint")
    s.add_argument("--out", help="write the calibrated checkpoint here (default: replace --checkpoint)")
    s.add_argument("--device", default="auto")
    s.set_defaults(fn=_cmd_calibrate)

    s = sub.add_parser("predict", help="classify files; one JSON object per line")
    s.add_argument("--checkpoint", help="model.pt (optional with --inference triton://...)")
    _inference_argument(s)
    s.add_argument("--priority", default="routine", choices=["urgent", "routine"],
                   help="queue priority on a remote inference server (urgent is served first)")
    s.add_argument("--device", default="auto")
    s.add_argument("paths", nargs="+")
    s.set_defaults(fn=_cmd_predict)

    s = sub.add_parser("explain", help="write a Grad-CAM / attention overlay PNG")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--device", default="auto")
    s.add_argument("--target", help="class to explain (default: predicted; binary: the positive class)")
    s.add_argument("path")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_cmd_explain)

    s = sub.add_parser("export", help="export to TorchScript, ONNX or a Triton model repository")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--format", required=True, choices=["torchscript", "onnx", "triton"])
    s.add_argument("--out", required=True, help="the file; with --format triton the model repository folder")
    s.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "python"],
                   help="triton: the backend config.pbtxt names (python: onnxruntime inside Triton's Python backend)")
    s.add_argument("--model-name", help="triton: the model's name in the repository (default: the model's name)")
    s.add_argument("--max-batch-size", type=int, default=32, help="triton: the largest batch the server forms")
    s.set_defaults(fn=_cmd_export)

    s = sub.add_parser("quickstart", help="train (once) and evaluate the default model on Br35H, then start the "
                       "DICOM node with it")
    s.add_argument("--out", default=str(quickstart_dir()), help="default: $MEDCLASS_HOME/quickstart (runs/quickstart)")
    s.add_argument("--epochs", type=int, default=4)
    s.add_argument("--device", default="auto")
    s.add_argument("--retrain", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.add_argument("--no-node", action="store_true", help="do not start the DICOM node at the end")
    s.add_argument("--node-port", type=int, default=11112, help="port of the DICOM node started at the end")
    s.set_defaults(fn=_cmd_quickstart)

    s = sub.add_parser("al-sim", help="simulate active learning on a labelled set: labels each strategy needs "
                       "to reach a fraction of the full-data AUC",
                       description="A flag left out keeps its default from medclass.active.SimulationConfig "
                       "(Br35H; cbam-resnet18 width 16 at 32 px; every strategy, seeds 0,1,2); the results "
                       "JSON records the settings used. bench/bench_al.py runs it for BENCHMARKS.md.")
    s.add_argument("--data", help="as for train; its train split is the pool, its test split "
                   "the held-out set")
    s.add_argument("--model", help="a name from 'medclass models'")
    s.add_argument("--model-arg", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="builder argument, repeatable (default: width=16, a 0.7 M-parameter cbam-resnet18)")
    s.add_argument("--image-size", type=int)
    s.add_argument("--initial", type=int, help="stratified labelled seed set")
    s.add_argument("--per-round", type=int, help="images labelled per round")
    s.add_argument("--budget", type=int, help="stop when this many images are labelled")
    s.add_argument("--seeds", type=_csv(int), help="comma-separated, e.g. 0,1,2")
    s.add_argument("--strategies", type=_csv(str), help="comma-separated, from random, entropy, margin, "
                   "least-confidence, bald, coreset, hybrid, typiclust; with --init also COLD+SCORE "
                   "(e.g. typiclust+margin: the first images by typiclust, then margin) and COLD@N+SCORE "
                   "(e.g. typiclust@50+hybrid: typiclust every round until 50 labels, then hybrid)")
    s.add_argument("--init", metavar="ENCODER", help="simulate on the frozen embeddings of this encoder "
                   "(medclass pretrain), model.pt or named init (with --model efficientnet-lite0: imagenet), "
                   "a logistic-regression head per round; defaults then: --initial 10 --per-round 10 "
                   "--budget 300 --strategies random,margin,typiclust,typiclust+margin")
    s.add_argument("--hybrid-score", help="the uncertainty the hybrid strategy shortlists by")
    s.add_argument("--epochs", type=int, help="passes over the labelled images per round")
    s.add_argument("--min-steps", type=int, help="at least this many optimiser steps per round")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--mc-samples", type=int, help="MC-dropout passes for bald")
    s.add_argument("--split-seed", type=int)
    s.add_argument("--target", type=float, help="fraction of the full-data AUC to reach")
    s.add_argument("--device")
    s.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy machine)")
    s.add_argument("--out", required=True, help="results JSON")
    s.set_defaults(fn=_cmd_al_sim)

    # The node parses its own flags (dicom_node.cli); '+' as prefix lets every flag through.
    s = sub.add_parser("node", help="run the DICOM triage node ('medclass node --help'; 'medclass node status')",
                       add_help=False, prefix_chars="+")
    s.add_argument("node_args", nargs=argparse.REMAINDER)
    s.set_defaults(fn=_cmd_node)
    return p


def main(args: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(args)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("matplotlib", "PIL", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return a.fn(a)
    except MedClassError as e:
        if a.verbose:
            raise
        print(f"medclass: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medclass: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
