"""Inference off the association threads: stable study in, SR (and forwards) queued out.

One worker thread takes ``ready`` studies from the database, reads the spooled
instances, lets the :class:`~dicom_node.selector.SeriesSelector` pick the model(s),
classifies every selected image in batches through :class:`medclass.inference.Classifier`
(GPU when present), combines the images with the model's own aggregation, builds
the TID 1500 report and queues it, and the triage forwards, in the outbox — all
committed in one transaction with the study's new state.

UIDs of the report are derived from (study, model, revision), so classifying a
study again after a crash yields the same SR instance, never a second one.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import pydicom
import torch

from dicom_node.config import NodeConfig
from dicom_node.metrics import NodeMetrics
from dicom_node.router import PRIORITIES, StudyRouter
from dicom_node.selector import SeriesInfo, SeriesSelector
from dicom_node.spool import JobDatabase, Spool, safe_name, write_durably
from medclass.errors import MedClassError
from medclass.inference import Classifier, forward_probabilities
from medclass.io import read_dicom_dataset
from medclass.sr import build_classification_sr

log = logging.getLogger("dicom_node.worker")


class InferenceWorker:
    """Classify stable studies.

    Parameters
    ----------
    config : NodeConfig
    db : JobDatabase
    spool : Spool
    metrics : NodeMetrics
    """

    def __init__(self, config: NodeConfig, db: JobDatabase, spool: Spool, metrics: NodeMetrics) -> None:
        self.config = config
        self.db = db
        self.spool = spool
        self.metrics = metrics
        self.selector = SeriesSelector(config.routes, config.checkpoint)
        # The rules are checked against the models' cards here, at start: a class no model has or an
        # operating point without a stored ROC stops the node (dicom_node.router).
        self.router = StudyRouter(config.forward, _model_cards(config))
        self.outbox_dir = config.data_path / "outbox"
        self._models: dict[str, Classifier] = {}

    def model(self, checkpoint: str) -> Classifier:
        """A loaded model, cached: loading once per node, not per study."""
        if checkpoint not in self._models:
            self._models[checkpoint] = Classifier(checkpoint, self.config.device)
            log.info("loaded %s (%s) on %s", checkpoint, self._models[checkpoint].loaded.name,
                     self._models[checkpoint].loaded.device)
        return self._models[checkpoint]

    def claim(self) -> str | None:
        """Take the oldest ready study, or ``None``."""
        for r in self.db.query("SELECT study_uid FROM studies WHERE state='ready' ORDER BY stable LIMIT 5"):
            if self.db.execute("UPDATE studies SET state='classifying' WHERE study_uid=? AND state='ready'",
                               (r["study_uid"],)):
                return r["study_uid"]
        return None

    def run_once(self) -> bool:
        """Classify one ready study if there is one; return whether there was."""
        uid = self.claim()
        if uid is None:
            return False
        t0 = time.perf_counter()
        try:
            outcome = self.classify_study(uid)
        except Exception as e:  # one study's failure must not stop the node
            log.exception("study %s failed: %s", uid, e)
            self.db.execute("UPDATE studies SET state='failed', error=? WHERE study_uid=? AND state='classifying'",
                            (f"{type(e).__name__}: {e}", uid))
            outcome = "failed"
        self.metrics.studies.labels(outcome).inc()
        self.metrics.inference_seconds.observe(time.perf_counter() - t0)
        return True

    # ------------------------------------------------------------------ one study

    def classify_study(self, study_uid: str) -> str:
        """Classify one claimed study; returns its outcome (``classified``, ``skipped``)."""
        instances = self.spool.instances(study_uid)
        headers: dict[str, pydicom.Dataset] = {}
        series: dict[str, SeriesInfo] = {}
        for inst in instances:
            try:
                ds = pydicom.dcmread(inst["path"], stop_before_pixels=True)
            except Exception as e:
                self._skip(inst, f"cannot read the spooled file ({type(e).__name__}: {e})")
                continue
            headers[inst["sop_uid"]] = ds
            series.setdefault(inst["series_uid"], SeriesInfo.from_dataset(ds))
        plan = self.selector.plan(list(series.values()))
        if not plan:
            desc = ", ".join(f"{s.series_uid} (modality {s.modality or '?'})" for s in series.values()) or "none"
            self._finish(study_uid, "skipped", None, f"no model matches series {desc}; add a rule to [[routes]] in "
                         "node.toml", [])
            return "skipped"
        results, outbox = [], []
        revision = self.db.query("SELECT revision FROM studies WHERE study_uid=?", (study_uid,))[0]["revision"] + 1
        for checkpoint, series_uids in plan.items():
            chosen = [i for i in instances if i["series_uid"] in series_uids and i["sop_uid"] in headers]
            res = self._classify(checkpoint, chosen)
            if res is None:
                continue
            probs, label, used, clf = res
            result = {"model": clf.loaded.name, "checkpoint": Path(checkpoint).name, "probabilities": probs,
                      "label": label, "images": len(used), "series": series_uids}
            # Calibration (medclass.calibration): the conformal set at the node's coverage, and the
            # operating points the [[forward]] rules use, go into the result and the report.
            pset = clf.prediction_set(probs, self.config.coverage) if self.config.coverage else None
            if pset is not None:
                result["prediction_set"] = pset
            results.append(result)
            outbox += self._queue_report(study_uid, revision, checkpoint, clf, probs, label,
                                         [headers[i["sop_uid"]] for i in used], pset)
            for rule in self.router.destinations(probs, label, checkpoint, pset):
                outbox.append(dict(key=f"forward:{study_uid}:{revision}:{rule.destination}", kind="forward",
                                   destination=str(rule.destination), path=None,
                                   priority=PRIORITIES[rule.priority]))
                result.setdefault("routed", []).append(str(rule.destination))
        if not results:
            self._finish(study_uid, "skipped", None, "no image of the study could be classified (see quarantine)", [])
            return "skipped"
        self._finish(study_uid, "classified", results, None, outbox, revision)
        return "classified"

    def _classify(self, checkpoint: str, chosen: list[dict[str, Any]]):
        clf = self.model(checkpoint)
        voi = not clf.loaded.preprocess_spec.get("window")
        tensors, metas, used = [], [], []
        for inst in chosen:
            try:
                image = read_dicom_dataset(pydicom.dcmread(inst["path"]), apply_voi=voi,
                                           name=f"SOP instance {inst['sop_uid']}")
                tensors.append(clf.preprocess(image))
            except MedClassError as e:
                self._skip(inst, str(e))
                continue
            except Exception as e:  # a decoder or transform failing on odd data: skip the image, not the study
                self._skip(inst, f"cannot preprocess ({type(e).__name__}: {e})")
                continue
            metas.append(image.meta)
            used.append(inst)
        if not used:
            return None
        x = torch.stack(tensors)
        rows = forward_probabilities(clf.loaded, x, clf.extra_inputs(metas), batch_size=self.config.batch_size)
        self.metrics.images_classified.inc(len(used))
        row = clf.aggregate(rows)
        probs = {c: round(float(p), 6) for c, p in zip(clf.classes, row)}
        return probs, clf.task.label_names(row), used, clf

    def _queue_report(self, study_uid: str, revision: int, checkpoint: str, clf: Classifier, probs, label,
                      sources: list[pydicom.Dataset], prediction_set: list[str] | None = None) -> list[dict[str, Any]]:
        dest = self.config.return_destination
        seed = [study_uid, clf.loaded.name, Path(checkpoint).name, str(revision)]
        sop_uid = pydicom.uid.generate_uid(entropy_srcs=seed + ["sop"])
        sr = build_classification_sr(
            sources, clf.card, probs, label, device_name=self.config.ae_title,
            series_instance_uid=pydicom.uid.generate_uid(entropy_srcs=seed + ["series"]), sop_instance_uid=sop_uid,
            series_number=9900 + min(revision, 99),
            operating_points=self.router.operating_points(checkpoint) or None, prediction_set=prediction_set,
            coverage=self.config.coverage if prediction_set is not None else None,
        )
        path = self.outbox_dir / safe_name(study_uid) / f"{sop_uid}.dcm"
        buf = io.BytesIO()
        sr.save_as(buf, enforce_file_format=True)
        write_durably(path, buf.getvalue())
        if dest is None:
            log.warning("study classified but no return_to is configured: the SR stays in %s; pass --return-to "
                        "AET@HOST:PORT", path.parent)
            return []
        return [dict(key=f"sr:{sop_uid}:{dest}", kind="sr", destination=str(dest), path=str(path), priority=0)]

    def _skip(self, inst: dict[str, Any], reason: str) -> None:
        log.warning("instance skipped in study %s: %s", inst["study_uid"], reason)
        self.metrics.rejected.labels("undecodable").inc()
        try:
            self.spool.quarantine(None, reason, calling_ae=inst.get("calling_ae"), sop_uid=inst["sop_uid"],
                                  study_uid=inst["study_uid"], source=Path(inst["path"]))
        except OSError as e:
            log.error("cannot quarantine %s: %s", inst["path"], e)
        self.db.execute("UPDATE instances SET skipped=? WHERE sop_uid=?", (reason, inst["sop_uid"]))

    def _finish(self, study_uid: str, state: str, results, error: str | None, outbox: list[dict[str, Any]],
                revision: int | None = None) -> None:
        now = time.time()
        with self.db.connect() as c:
            for o in outbox:
                c.execute("INSERT OR IGNORE INTO outbox (key, study_uid, kind, destination, path, priority, created) "
                          "VALUES (?,?,?,?,?,?,?)",
                          (o["key"], study_uid, o["kind"], o["destination"], o["path"], o["priority"], now))
            c.execute("UPDATE studies SET state=CASE WHEN state='classifying' THEN ? ELSE state END, result=?, "
                      "error=?, classified=?, revision=COALESCE(?, revision) WHERE study_uid=?",
                      (state, json.dumps(results) if results else None, error, now, revision, study_uid))
        if error:
            log.info("study %s %s: %s", study_uid, state, error)
        else:
            log.info("study %s %s: %s", study_uid, state,
                     "; ".join(f"{r['model']} → {r['label']}" for r in results or []))


def _model_cards(config: NodeConfig) -> dict[str, dict[str, Any]]:
    """The card of every model the node classifies with: the default checkpoint and each route's."""
    from medclass.checkpoint import read_card

    paths = {config.checkpoint, *(r.get("checkpoint") for r in config.routes)} - {None}
    return {p: read_card(p) for p in sorted(paths)}
