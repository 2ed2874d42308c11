"""The app's settings, from MONAI Label's ``--conf KEY VALUE`` pairs.

========================  ==========================================================
``models``                registry names, comma separated (default ``resnet18``;
                          ``medclass models`` lists them)
``checkpoint``            a ``model.pt`` to serve until the first training run
                          (default: the quickstart model, ``$MEDCLASS_HOME/quickstart/model.pt``,
                          ``MEDCLASS_HOME`` defaulting to ``runs``, when it exists)
``classes`` / ``task``    class names (comma separated) and task type, for a
                          project without a checkpoint yet
``model_dir``             where published checkpoints live (default ``<app>/model``)
``image_size``            training input size (default: the checkpoint's, else 64)
``epochs``                default epochs of a full training run (a request's
                          ``max_epochs`` wins)
``train_mode``            what ``POST /train`` does by default: ``head`` (refit the
                          served model's linear head on its embeddings: seconds)
                          or ``full`` (fine-tune the whole model); default ``head``
``init``                  an encoder checkpoint (``medclass pretrain``), a
                          ``model.pt`` or a named initialisation (``imagenet``) the
                          first training run starts from (``head`` mode: a linear
                          probe on it; ``full``: fine-tuned)
``hold_seconds``          how long an image handed out by ``/activelearning`` stays
                          reserved for its annotator (default 600)
``mc_samples``            Monte-Carlo dropout passes for BALD (default 10)
``score_on_start``        score the datastore with the served model when the server
                          starts (default ``true``)
``retrain_on_label``      refit the served model's head in the server after every
                          saved label, publish it if no worse and re-score (default
                          ``true``): the next sample is ready about a second later
``device``                ``auto`` (GPU when present), ``cpu`` or ``cuda``
``dicomweb_filter``       QIDO search filter (JSON) for a DICOMweb datastore; default:
                          every image series of every modality
``inference``             where ``POST /infer`` runs the model: ``local`` (default) or
                          ``triton://HOST[:PORT]/MODEL``, a Triton Inference Server
                          serving ``medclass export --format triton`` of the served
                          checkpoint (the card is checked: 409 when it differs; 503
                          while the server is down). With one model per app only.
                          Scoring for active learning, heat maps and training stay
                          local: they need the model's weights and embeddings here.
========================  ==========================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medclass.checkpoint import read_card
from medclass.errors import MedClassError
from medclass.inference import PublishedModel
from medclass.models import model_info
from medclass.paths import default_checkpoint
from medclass.tasks import Task

DEFAULT_MODEL = "resnet18"


@dataclass
class ModelSlot:
    """One served model: its registry name, task and published checkpoint."""

    name: str
    task: Task
    published: PublishedModel
    image_size: int
    dimension: int = 2
    refitter: Any = None  # the server's HeadRefitter, once a label was saved (lib.trainers.classify)
    #: What POST /infer classifies with: ``published`` itself (local), or the same checkpoint's card
    #: checked against a Triton server that runs the model (``--conf inference triton://...``).
    served: PublishedModel | None = None

    def __post_init__(self) -> None:
        if self.served is None:
            self.served = self.published


@dataclass
class AppConfig:
    models: dict[str, ModelSlot] = field(default_factory=dict)
    model_dir: Path = Path("model")
    epochs: int = 10
    train_mode: str = "head"
    init: Path | None = None
    hold_seconds: float = 600.0
    mc_samples: int = 10
    score_on_start: bool = True
    retrain_on_label: bool = True
    refit_wait_seconds: float = 120.0
    device: str = "auto"
    dicomweb_filter: dict = field(default_factory=dict)
    inference: str = "local"

    @property
    def task(self) -> Task:
        """The labelling task (every model of one app labels the same classes)."""
        return next(iter(self.models.values())).task


def _task_from(conf: dict[str, str], card: dict | None) -> Task:
    if conf.get("classes"):
        classes = [c.strip() for c in conf["classes"].split(",") if c.strip()]
        kind = conf.get("task") or ("binary" if len(classes) == 2 else "multiclass")
        try:
            return Task(kind, classes)
        except ValueError as e:
            raise MedClassError(f"--conf classes/task: {e}", "e.g. --conf classes normal,benign,malignant") from None
    if card:
        return Task(card["task"]["type"], list(card["task"]["classes"]))
    raise MedClassError("the app does not know its classes: no checkpoint and no --conf classes",
                        "start with --conf checkpoint MODEL.pt (e.g. from 'medclass quickstart') or "
                        "--conf classes NAME1,NAME2[,...]")


def _json_conf(conf: dict[str, str], key: str) -> dict:
    raw = conf.get(key)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise MedClassError(f"--conf {key} is not JSON ({e.msg})", f"e.g. --conf {key} '{{\"Modality\": \"CR\"}}'") \
            from None
    if not isinstance(value, dict):
        raise MedClassError(f"--conf {key} must be a JSON object", f"e.g. --conf {key} '{{\"Modality\": \"CR\"}}'")
    return value


def _inference(conf: dict[str, str], names: list[str]) -> str:
    from medclass.remote import is_remote, parse_url

    value = (conf.get("inference") or "local").strip()
    if value == "local":
        return value
    if not is_remote(value):
        raise MedClassError(f"--conf inference {value!r} is not an inference backend",
                            "use local or triton://HOST[:PORT]/MODEL")
    parse_url(value)
    if len(names) != 1:
        raise MedClassError(f"--conf inference {value} names one served model, but the app serves {len(names)}",
                            "serve one model per app with remote inference (--conf models NAME)")
    return value


def _flag(conf: dict[str, str], key: str, default: bool = True) -> bool:
    return str(conf.get(key, default)).strip().lower() in ("1", "true", "yes", "on")


def _train_mode(conf: dict[str, str]) -> str:
    mode = (conf.get("train_mode") or "head").strip().lower()
    if mode not in ("head", "full"):
        raise MedClassError(f"--conf train_mode {mode!r} is not a training mode", "use head or full")
    return mode


def _init(conf: dict[str, str]) -> Path | None:
    if not conf.get("init"):
        return None
    p = Path(conf["init"])
    if not p.is_file() and any(c in conf["init"] for c in "/\\."):
        raise MedClassError(f"--conf init {p}: no such file",
                            "pass an encoder checkpoint ('medclass pretrain'), a model.pt, or a name the "
                            "model offers (e.g. imagenet for efficientnet-lite0)")
    return p  # a file, or a named initialisation that medclass.transfer.load_init resolves


def load_config(app_dir: str, conf: dict[str, str]) -> AppConfig:
    """Parse ``conf`` and prepare one :class:`ModelSlot` per model."""
    names = [n.strip() for n in (conf.get("models") or DEFAULT_MODEL).split(",") if n.strip()]
    for n in names:
        model_info(n)  # unknown names fail here, with the registry's suggestions
    cfg = AppConfig(
        model_dir=Path(conf.get("model_dir") or Path(app_dir) / "model"),
        epochs=int(conf.get("epochs", 10)),
        train_mode=_train_mode(conf),
        init=_init(conf),
        hold_seconds=float(conf.get("hold_seconds", 600)),
        mc_samples=int(conf.get("mc_samples", 10)),
        score_on_start=_flag(conf, "score_on_start"),
        retrain_on_label=_flag(conf, "retrain_on_label"),
        device=conf.get("device", "auto"),
        dicomweb_filter=_json_conf(conf, "dicomweb_filter"),
        inference=_inference(conf, names),
    )
    start = Path(conf["checkpoint"]) if conf.get("checkpoint") else None
    if start is not None and not start.is_file():
        raise MedClassError(f"--conf checkpoint {start}: no such file", "pass a model.pt written by 'medclass train'")
    if start is None:
        start = default_checkpoint()  # the quickstart model ($MEDCLASS_HOME), as the CLI and the node find it
    start_card = read_card(start) if start else None
    for n in names:
        published = PublishedModel(cfg.model_dir / n / "model.pt", cfg.device)
        card = published.card()
        if card is None and start_card is not None and start_card.get("model", {}).get("name") == n:
            published.publish(start)  # serve the given checkpoint until the first training run
            card = start_card
        task = _task_from(conf, card or start_card)
        pre = (card or {}).get("preprocess", {})
        size = int(conf.get("image_size") or pre.get("image_size") or 64)
        served = None
        if cfg.inference != "local":
            served = PublishedModel(published.path, cfg.device, inference=cfg.inference)
        cfg.models[n] = ModelSlot(n, task, published, size, int(pre.get("spatial_dims", 2)), served=served)
    tasks = {(s.task.type, tuple(s.task.classes)) for s in cfg.models.values()}
    if len(tasks) > 1:
        raise MedClassError(f"the models disagree on the classes: {sorted(tasks)}",
                            "serve models of one labelling task per app (or pass --conf classes)")
    return cfg

