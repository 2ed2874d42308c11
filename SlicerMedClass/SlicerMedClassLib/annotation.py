"""The annotation loop through a MONAI Label server: label, wait for the app's refit, next sample.

Standard library only (it talks through :class:`SlicerMedClassLib.client.MonaiLabelClient`),
so the widget uses it before torch or medclass are installed. The project's app
refits the served model's head in the server after every saved label (seconds)
and publishes it only when it is no worse on held-out labels; its ``/info/``
``train_stats`` say what is served (``version``, ``init``, ``conf_init``) and
count the refits (``refit``: ``requested`` / ``done``). The loop::

    loop = AnnotationLoop(client, "resnet18", "entropy")
    sample = loop.next_sample()                  # {"id": ..., ...}
    refit = loop.submit(sample["id"], "tumour")  # returns after the app's refit that saw this label
    sample = loop.next_sample()                  # ranked by the refitted model

Waiting watches the app's counters (not a sleep of a guessed length): after the
label is stored, ``requested`` already counts its refit, and the refit that served
it sets ``done`` to at least that number. A server without these counters (another
app, or ``retrain_on_label`` off) is not waited for.

:meth:`AnnotationLoop.refit_now` asks for the app's fast training mode (``head``)
and :meth:`AnnotationLoop.full_fine_tune` for a full run (``full``); both wait for
the training task and return what it reported (``last_run``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from SlicerMedClassLib.client import MonaiLabelClient, MonaiLabelError

#: Seconds between two status requests while waiting for the server.
POLL_SECONDS = 0.2


@dataclass
class ServedModel:
    """What the app serves for one model, from ``/info/`` ``train_stats``."""

    model: str
    version: str | None
    mode: str | None
    init: dict[str, Any] | None
    conf_init: str | None
    auc: float | None
    trained_on: int | None
    last_run: dict[str, Any] | None
    refit: dict[str, Any] | None
    retrain_on_label: bool | None

    @classmethod
    def from_stats(cls, model: str, stats: dict[str, Any] | None) -> ServedModel:
        s = stats or {}
        return cls(model, s.get("version"), s.get("mode"), s.get("init"), s.get("conf_init"), s.get("auc"),
                   s.get("trained_on"), s.get("last_run"), s.get("refit"), s.get("retrain_on_label"))

    def init_text(self) -> str:
        """One line: where the served model's weights came from."""
        if self.version is None:
            start = f"the first training starts from {self.conf_init}" if self.conf_init else \
                "the first training starts from scratch"
            return f"No model served yet; {start}."
        if self.init:
            name = self.init.get("name") or self.init.get("path")
            kind = self.init.get("kind")
            origin = f"initialised from {name}" + (f" ({kind})" if kind and kind != name else "")
        else:
            origin = "trained from scratch"
        how = f", last trained by {self.mode}" if self.mode else ""
        auc = f", held-out AUC {self.auc:.3f}" if isinstance(self.auc, (int, float)) else ""
        conf = f"; app --conf init {self.conf_init}" if self.conf_init else ""
        return f"Served model {origin}{how}{auc}{conf}."


class AnnotationLoop:
    """Label, wait for the served model to take the label, fetch the next sample.

    Parameters
    ----------
    client : MonaiLabelClient
        Connected to the project's MONAI Label app.
    model : str
        The served model's name (``/info/`` ``models``).
    strategy : str
        Active-learning strategy of :meth:`next_sample` (``/info/`` ``strategies``).
    max_wait : float
        Most seconds to wait for a refit or a training run before giving up with
        a message (the app keeps working; the next request sees its result).
    """

    def __init__(self, client: MonaiLabelClient, model: str, strategy: str = "random", max_wait: float = 600.0):
        if not model:
            raise ValueError("no model chosen; connect to the server and choose one of its models")
        self.client, self.model, self.strategy, self.max_wait = client, model, strategy, float(max_wait)

    # ------------------------------------------------------------------ what is served
    def served(self, info: dict[str, Any] | None = None) -> ServedModel:
        """The served model's version, init and last run."""
        info = self.client.info() if info is None else info
        return ServedModel.from_stats(self.model, (info.get("train_stats") or {}).get(self.model))

    # ------------------------------------------------------------------ the loop
    def submit(self, image_id: str, label: str | None = None, labels: list[str] | None = None,
               wait: bool = True) -> dict[str, Any] | None:
        """Store an image-level label; with ``wait``, return after the app's refit that saw it.

        Returns
        -------
        dict or None
            The refit's report (``last_run``: ``published``, ``new_score``,
            ``served_score``, ``fit_seconds``, ``seconds``, ``version``), ``None``
            when the app does not refit after labels (no model served yet, or
            ``retrain_on_label`` off).
        """
        self.client.save_label(image_id, label=label, labels=labels)
        if not wait:
            return None
        return self.wait_for_refit()

    def wait_for_refit(self, on_wait: Callable[[ServedModel], None] | None = None) -> dict[str, Any] | None:
        """Wait until every refit requested so far is done; returns the last run, or None when none runs."""
        served = self.served()
        counts = served.refit
        if not counts:
            return None
        target = int(counts.get("requested") or 0)
        deadline = time.monotonic() + self.max_wait
        while int((served.refit or {}).get("done") or 0) < target:
            if time.monotonic() > deadline:
                raise MonaiLabelError(f"the server did not finish refitting {self.model} within {self.max_wait:g} s; "
                                      "ask for the next sample again later (the refit goes on)",
                                      self.client.server_url + "/info/")
            if on_wait is not None:
                on_wait(served)
            time.sleep(POLL_SECONDS)
            served = self.served()
        return served.last_run

    def next_sample(self) -> dict[str, Any] | None:
        """The next image by :attr:`strategy` (scoring the datastore first if it has no scores); None when done."""
        return self.client.next_sample_scored(self.strategy, max_wait=self.max_wait)

    def label_and_next(self, image_id: str, label: str | None = None,
                       labels: list[str] | None = None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """:meth:`submit` then :meth:`next_sample`: ``(refit report, next sample)``."""
        refit = self.submit(image_id, label, labels)
        return refit, self.next_sample()

    # ------------------------------------------------------------------ training on request
    def refit_now(self, force: bool = False) -> dict[str, Any] | None:
        """The app's fast training mode: refit the served head on every label now (seconds)."""
        return self._train({"mode": "head", **({"force": True} if force else {})})

    def full_fine_tune(self, epochs: int | None = None, force: bool = False,
                       params: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """A full fine-tune of the served model (or of ``--conf init`` before the first) on every label."""
        request = {"mode": "full", **(params or {})}
        if epochs:
            request["max_epochs"] = int(epochs)
        if force:
            request["force"] = True
        return self._train(request)

    def _train(self, params: dict[str, Any]) -> dict[str, Any] | None:
        before = self.served().last_run
        self.wait_for_refit()  # a refit in the server and a training run would publish over each other
        self.client.train(self.model, params)
        deadline = time.monotonic() + self.max_wait
        while True:
            task = self.client.train_status()
            if isinstance(task, dict) and task.get("status") not in ("SUBMITTED", "RUNNING"):
                break
            if time.monotonic() > deadline:
                raise MonaiLabelError(f"training {self.model} is still running after {self.max_wait:g} s; "
                                      "follow it in the Training section", self.client.server_url + "/train/")
            time.sleep(POLL_SECONDS)
        if task.get("status") != "DONE":
            details = " ".join(str(x) for x in (task.get("details") or [])[-3:])
            raise MonaiLabelError(f"training {self.model} ended {task.get('status')}: {details[-400:]}",
                                  self.client.server_url + "/train/")
        run = self.served().last_run
        if run == before:
            return None
        return run


def run_text(run: dict[str, Any] | None) -> str:
    """One line for the widget about a refit or training run's report."""
    if not run:
        return "The server did not refit (no model served yet, or it refits only on request)."
    if run.get("skipped"):
        return f"Not refitted: {run['skipped']}."
    took = f" in {run['seconds']:.1f} s" if isinstance(run.get("seconds"), (int, float)) else ""
    mode = run.get("mode") or "training"
    if run.get("published"):
        score = run.get("new_score")
        scored = f" (held-out {run.get('metric')} {score:.3f})" if isinstance(score, (int, float)) else ""
        return f"{mode} published{scored}{took}."
    return f"{mode}{took}: {run.get('message') or 'not published'}"
