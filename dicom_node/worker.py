"""Inference off the association threads: stable study in, SR (and forwards) queued out.

One worker thread takes ``ready`` studies from the database, reads the spooled
instances, lets the :class:`~dicom_node.selector.SeriesSelector` pick the model(s),
classifies every selected image in batches through :class:`medclass.inference.Classifier`
(GPU when present), combines the images with the model's own aggregation, builds
the TID 1500 report and queues it, and the triage forwards, in the outbox — all
committed in one transaction with the study's new state.

UIDs of the report are derived from (study, model, revision), so classifying a
study again after a crash yields the same SR instance, never a second one.

A model may run on a Triton Inference Server (``inference = "triton://..."``, top level
or per route). A study whose header asks for STAT or HIGH priority (Requested Procedure
Priority), or whose route says ``priority = "urgent"``, is sent at Triton's urgent
priority. While the server is unavailable the study goes back to ``ready`` with the
reason "waiting for inference server; retrying" (:meth:`JobDatabase.wait_for_inference`:
nothing is lost), the worker waits a backoff (doubling from ``retry_base_seconds`` up to
``retry_max_seconds``) before it claims again, and the gauge
``medclass_node_inference_up`` is 0 until a request succeeds.

One current report per study and model:

- an unchanged resend (the same set of SOP Instance UIDs as the current report
  covers, whatever the bytes) gives no new report: the study returns to
  ``classified`` at once. DICOM gives a changed instance a new SOP Instance UID.
- a study that grew (new instances or series, the rest after a restart) gets a new
  report, revision + 1: a new SOP Instance UID, the *same* SR series (its UID is
  derived from study and model, not revision; SeriesNumber 9900, InstanceNumber the
  revision) and a Predecessor Documents Sequence naming the report it supersedes.
- a study the node found still receiving at a restart, and that got nothing more
  since, is reported with CompletionFlag PARTIAL; COMPLETE otherwise.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement
from pydicom.tag import BaseTag

from dicom_node.config import NodeConfig
from dicom_node.jobs import JobDatabase, Priority, sop_digest
from dicom_node.metrics import NodeMetrics
from dicom_node.prepare import PreparedCache
from dicom_node.router import StudyRouter
from dicom_node.selector import SeriesInfo, SeriesSelector
from dicom_node.spool import Spool, safe_name, write_durably
from medclass.errors import InferenceUnavailable, MedClassError
from medclass.inference import Classifier
from medclass.sr import (
    IMAGE_LIBRARY_MAX_IMAGES,
    TYPE2_PATIENT_AND_STUDY,
    build_classification_sr,
    report_reference,
)

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
        self.selector = SeriesSelector(config.routes, config.checkpoint, config.classify_any_modality,
                                       config.inference)
        # The rules are checked against the models' cards here, at start: a class no model has or an
        # operating point without a stored ROC stops the node (dicom_node.router).
        self.router = StudyRouter(config.forward, _model_cards(config))
        self.outbox_dir = config.data_path / "outbox"
        self._models: dict[tuple[str, str], Classifier] = {}
        self._unavailable = 0  # consecutive studies put back because the inference server was down
        self._retry_at = 0.0  # no claim before this (time.monotonic()): the backoff
        # Images prepared as they arrived (dicom_node.prepare); whatever is missing is prepared here.
        self.cache = PreparedCache(config.data_path / "prepared") if config.preprocess_on_arrival else None

    def model(self, checkpoint: str) -> Classifier:
        """A loaded model, cached: loading once per node, not per study.

        With a remote ``inference`` only the card is read here; the gRPC channel is made
        on the first request, in the thread's own process.
        """
        inference = self.selector.inference_of(checkpoint)
        key = (checkpoint, inference)
        if key not in self._models:
            clf = self._models[key] = Classifier(checkpoint, self.config.device, inference=inference)
            where = clf.inference if clf.remote is not None else clf.loaded.device
            log.info("loaded %s (%s) on %s", checkpoint, clf.loaded.name, where)
        return self._models[key]

    def claim(self) -> str | None:
        """Take the oldest ready study, or ``None`` (also while backing off from a down inference server)."""
        if time.monotonic() < self._retry_at:
            return None
        return self.db.claim_ready()

    def backoff_seconds(self) -> float:
        """Seconds before the next claim (0 when not backing off)."""
        return max(0.0, self._retry_at - time.monotonic())

    def run_once(self) -> bool:
        """Classify one ready study if there is one; return whether there was."""
        uid = self.claim()
        if uid is None:
            return False
        t0 = time.perf_counter()
        try:
            outcome = self.classify_study(uid)
        except InferenceUnavailable as e:  # not the study's fault: it waits in ready, nothing is lost
            self._unavailable += 1
            delay = min(self.config.retry_max_seconds,
                        self.config.retry_base_seconds * 2 ** min(self._unavailable - 1, 30))
            self._retry_at = time.monotonic() + delay
            self.metrics.inference_up.labels(e.url).set(0)
            self.db.wait_for_inference(uid, f"waiting for inference server; retrying in {delay:.0f} s "
                                            f"({e.url}: {e.reason})"[:400])
            log.warning("study %s waits: inference server %s unavailable (%s); retrying in %.0f s", uid, e.url,
                        e.reason, delay)
            return False  # nothing more to claim until the backoff has passed
        except Exception as e:  # one study's failure must not stop the node
            reason = failure_reason(e, uid)
            log.error("study %s failed: %s", uid, reason)  # one line; the traceback with -v
            log.debug("study %s: traceback of the failure", uid, exc_info=True)
            self.db.finish_failed(uid, reason)
            outcome = "failed"
        if self.cache is not None:
            self.cache.discard_study(uid)  # classified again later (more instances, a resend): prepared again
        self.metrics.studies.labels(outcome).inc()
        self.metrics.inference_seconds.observe(time.perf_counter() - t0)
        return True

    # ------------------------------------------------------------------ one study

    def classify_study(self, study_uid: str) -> str:
        """Classify one claimed study; returns its outcome (``classified``, ``unchanged``, ``skipped``)."""
        study = self.db.study(study_uid)
        every = self.db.instances(study_uid, include_skipped=True)  # one read: the set the result covers
        digest = sop_digest(i["sop_uid"] for i in every)
        if study and study["digest"] == digest:
            # The same instances as the current report (a resend): no new report, no new forward.
            self.db.finish_unchanged(study_uid)
            log.info("study %s resent unchanged (%d instances): its report stands", study_uid, len(every))
            return "unchanged"
        instances = [i for i in every if i["skipped"] is None]
        complete = not (study and study["interrupted"])
        headers: dict[str, pydicom.Dataset] = {}
        series: dict[str, SeriesInfo] = {}
        firsts: dict[str, pydicom.Dataset] = {}
        # A large study's report names its images by reference only (medclass.sr, no image library), so one
        # header per series is read and the other images' references come from the job database: reading
        # every header was a quarter of a 500-image series' time. A file that cannot be read is still found
        # and quarantined when its pixels are.
        by_reference = len(instances) > IMAGE_LIBRARY_MAX_IMAGES
        references: dict[str, SeriesReferences] = {}
        for inst in instances:
            if by_reference and inst["series_uid"] in firsts:
                if inst["series_uid"] not in references:
                    references[inst["series_uid"]] = SeriesReferences(inst, firsts[inst["series_uid"]])
                headers[inst["sop_uid"]] = references[inst["series_uid"]].dataset(inst)
                continue
            try:
                ds = pydicom.dcmread(inst["path"], stop_before_pixels=True)
            except Exception as e:
                self._skip(inst, f"cannot read the spooled file ({type(e).__name__}: {e})")
                continue
            headers[inst["sop_uid"]] = ds
            firsts.setdefault(inst["series_uid"], ds)
            series.setdefault(inst["series_uid"], SeriesInfo.from_dataset(ds))
        plan = self.selector.plan(list(series.values()))
        if not plan:  # the selector says why for each series (modality, body part or no rule), with a remedy
            why = "; ".join(self.selector.skipped.values()) or "no image series to classify (see quarantine)"
            self._skipped(study_uid, f"{why}; then 'medclass node resend {study_uid}'")
            return "skipped"
        results, outbox, reports = [], [], []
        revision = (study["revision"] if study else 0) + 1
        # The ingest read STAT/HIGH from every instance's header (studies.asks_urgent): one source, not re-read here.
        urgent = bool(study and study.get("asks_urgent"))
        for checkpoint, series_uids in plan.items():
            chosen = [i for i in instances if i["series_uid"] in series_uids and i["sop_uid"] in headers]
            priority = "urgent" if urgent else self.selector.priority_of(checkpoint)
            res = self._classify(checkpoint, chosen, priority)
            if res is None:
                continue
            probs, label, used, clf = res
            result = {"model": clf.loaded.name, "checkpoint": Path(checkpoint).name, "probabilities": probs,
                      "label": label, "images": len(used), "series": series_uids, "complete": complete}
            # Calibration (medclass.calibration): the conformal set at the node's coverage, and the
            # operating points the [[forward]] rules use, go into the result and the report.
            pset = clf.prediction_set(probs, self.config.coverage) if self.config.coverage else None
            if pset is not None:
                result["prediction_set"] = pset
            results.append(result)
            report, queued = self._queue_report(study_uid, revision, checkpoint, clf, probs, label,
                                                [headers[i["sop_uid"]] for i in used], complete, pset)
            reports.append(report)
            outbox += queued
            for rule in self.router.destinations(probs, label, checkpoint, pset):
                outbox.append(dict(key=f"forward:{study_uid}:{revision}:{rule.destination}", kind="forward",
                                   destination=str(rule.destination), path=None,
                                   priority=Priority.of_forward_rule(rule.priority)))
                result.setdefault("routed", []).append(str(rule.destination))
        if not results:
            self._skipped(study_uid, "no image of the study could be classified; the quarantine folder holds them "
                          "with the reasons")
            return "skipped"
        self.db.finish_classified(study_uid, revision, results, digest, reports, outbox)
        log.info("study %s classified (revision %d%s): %s", study_uid, revision, "" if complete else ", PARTIAL",
                 "; ".join(f"{r['model']} → {r['label']}" for r in results))
        return "classified"

    def _classify(self, checkpoint: str, chosen: list[dict[str, Any]], priority: str = "routine"):
        clf = self.model(checkpoint)
        if self.cache is None:
            res = clf.classify_study([inst["path"] for inst in chosen], batch_size=self.config.batch_size,
                                     priority=priority)
        else:
            fp, prepared, inline = clf.preprocess_fingerprint, [], 0
            for inst in chosen:
                item = self.cache.load(fp, inst["study_uid"], inst["sop_uid"])
                if item is None:  # not reached yet, or lost in a crash: the spooled file is the record
                    item, inline = clf.try_prepare(inst["path"]), inline + 1
                prepared.append(item)
            self.metrics.images_prepared.labels("arrival").inc(len(chosen) - inline)
            self.metrics.images_prepared.labels("inline").inc(inline)
            res = clf.classify_prepared(prepared, batch_size=self.config.batch_size, priority=priority)
        if clf.remote is not None and res.used:
            self.metrics.inference_up.labels(clf.inference).set(1)
            self._unavailable, self._retry_at = 0, 0.0
        for k, reason in res.skipped.items():
            self._skip(chosen[k], reason)
        if not res.used:
            return None
        used = [chosen[k] for k in res.used]
        self.metrics.images_classified.inc(len(used))
        return res.probabilities, res.label, used, clf

    def _queue_report(self, study_uid: str, revision: int, checkpoint: str, clf: Classifier, probs, label,
                      sources: list[pydicom.Dataset], complete: bool = True,
                      prediction_set: list[str] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Write the SR into the outbox folder; return its ``reports`` row and what to queue."""
        dest = self.config.return_destination
        model_key = f"{clf.loaded.name}:{Path(checkpoint).name}"
        seed = [study_uid, clf.loaded.name, Path(checkpoint).name]
        sop_uid = pydicom.uid.generate_uid(entropy_srcs=seed + [str(revision), "sop"])
        # One series per study and model, whatever the revision: a superseding report joins its predecessor.
        series_uid = pydicom.uid.generate_uid(entropy_srcs=seed + ["series"])
        previous = self.db.previous_report(study_uid, model_key, revision)
        predecessors = [report_reference(study_uid, previous["series_uid"], previous["sop_uid"],
                                         previous["sop_class"])] if previous else None
        sr = build_classification_sr(
            sources, clf.card, probs, label, device_name=self.config.ae_title,
            series_instance_uid=series_uid, sop_instance_uid=sop_uid, series_number=9900, instance_number=revision,
            predecessors=predecessors, complete=complete,
            operating_points=self.router.operating_points(checkpoint) or None, prediction_set=prediction_set,
            coverage=self.config.coverage if prediction_set is not None else None,
        )
        path = self.outbox_dir / safe_name(study_uid) / f"{sop_uid}.dcm"
        buf = io.BytesIO()
        sr.save_as(buf, enforce_file_format=True)
        write_durably(path, buf.getvalue())
        report = dict(sop_uid=sop_uid, series_uid=series_uid, sop_class=str(sr.SOPClassUID), model_key=model_key,
                      complete=complete, path=str(path))
        if dest is None:
            log.warning("study classified but no return_to is configured: the SR stays in %s; pass --return-to "
                        "AET@HOST:PORT", path.parent)
            return report, []
        return report, [dict(key=f"sr:{sop_uid}:{dest}", kind="sr", destination=str(dest), path=str(path),
                             priority=Priority.ROUTINE)]

    def _skip(self, inst: dict[str, Any], reason: str) -> None:
        log.warning("instance skipped in study %s: %s", inst["study_uid"], reason)
        self.metrics.rejected.labels("undecodable").inc()
        try:
            self.spool.quarantine(None, reason, calling_ae=inst.get("calling_ae"), sop_uid=inst["sop_uid"],
                                  study_uid=inst["study_uid"], source=Path(inst["path"]))
        except OSError as e:
            log.error("cannot quarantine %s: %s", inst["path"], e)
        self.db.mark_instance_skipped(inst["sop_uid"], reason)

    def _skipped(self, study_uid: str, reason: str) -> None:
        self.db.finish_skipped(study_uid, reason)
        log.info("study %s skipped: %s", study_uid, reason)


class SeriesReferences:
    """What a report needs of the images of one series it names by reference only, made cheaply.

    A reference holds the image's own UIDs (from the job database) and, shared with every
    other reference of the series (the element objects, not copies), the Type 2 patient and
    study attributes, the modality and the Image Pixel description of the series' first header:
    highdicom takes a source image only with a pixel description, and reads patient and study
    from the first source, which is a reference when the study's first image was skipped.
    Setting them one by one on 500 datasets was a tenth of a 500-image series' time.

    Parameters
    ----------
    inst : dict
        An instance row of the series (its study and series UIDs are used).
    series_header : pydicom.Dataset
        The series' first header.
    """

    def __init__(self, inst: dict[str, Any], series_header: pydicom.Dataset) -> None:
        shared = pydicom.Dataset()
        for keyword in (*TYPE2_PATIENT_AND_STUDY, *PIXEL_DESCRIPTION):
            if keyword in series_header:
                shared[keyword] = series_header[keyword]
        shared.StudyInstanceUID = inst["study_uid"]
        shared.SeriesInstanceUID = inst["series_uid"]
        shared.Modality = series_header.get("Modality", "")
        self.sop_class = str(series_header.SOPClassUID)
        shared.SOPClassUID = self.sop_class
        self.elements = {elem.tag: elem for elem in shared}

    def dataset(self, inst: dict[str, Any]) -> pydicom.Dataset:
        """The reference of one instance of the series."""
        elements = dict(self.elements)
        elements[_SOP_INSTANCE_UID] = DataElement(_SOP_INSTANCE_UID, "UI", inst["sop_uid"])
        if inst["sop_class"] and inst["sop_class"] != self.sop_class:
            elements[_SOP_CLASS_UID] = DataElement(_SOP_CLASS_UID, "UI", inst["sop_class"])
        return pydicom.Dataset(elements)


_SOP_INSTANCE_UID, _SOP_CLASS_UID = BaseTag(0x00080018), BaseTag(0x00080016)


#: The Image Pixel module's description attributes (not the pixels).
PIXEL_DESCRIPTION = ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored",
                     "HighBit", "PixelRepresentation", "PlanarConfiguration", "NumberOfFrames")

def failure_reason(error: BaseException, study_uid: str) -> str:
    """One line for ``node status`` and the log: what failed, and what to do."""
    again = f"then 'medclass node resend {study_uid}' classifies it again"
    if isinstance(error, MedClassError):
        what = error.message
        remedy = f"{error.remedy}; {again}" if error.remedy else again
    elif isinstance(error, OSError):
        what = f"cannot read or write the node's files ({error.strerror or error})"
        remedy = f"check the disk and the permissions of the data folder, {again}"
    else:
        what = f"classification raised {type(error).__name__}: {error}".replace("\n", " ")
        remedy = f"run the node with -v for the traceback and report it, {again}"
    return f"{what[:300]}; {remedy}"


def _model_cards(config: NodeConfig) -> dict[str, dict[str, Any]]:
    """The card of every model the node classifies with: the default checkpoint and each route's."""
    from medclass.checkpoint import read_card

    paths = {config.checkpoint, *(r.get("checkpoint") for r in config.routes)} - {None}
    return {p: read_card(p) for p in sorted(paths)}
