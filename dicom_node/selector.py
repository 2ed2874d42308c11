"""Series selection: which model classifies which series.

Rules come from ``[[routes]]`` in ``node.toml``; the first rule whose every given
field matches a series wins. Fields: ``modality``, ``body_part`` (Body Part
Examined), ``sop_class`` (UID or its name), ``series_description`` (a regular
expression, searched), ``checkpoint``, and two that say how its model runs:
``inference`` (``local`` or ``triton://HOST[:PORT]/MODEL``; default: the node's
``inference``) and ``priority`` (``urgent`` or ``routine``: the queue priority on a
Triton server; a study whose header says STAT or HIGH is urgent whatever the route).

Without rules, the default checkpoint classifies only the series it was trained
for: the modality (and the body part, when the series and the model's card both
give one) recorded in its card (:mod:`medclass.data.scope`). Other series are
skipped with a reason. A ``[[routes]]`` rule is an explicit choice and is
followed as written; ``classify_any_modality = true`` lifts the check for the
default model.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import UID

from medclass.data.scope import scope_mismatch
from medclass.errors import MedClassError

log = logging.getLogger("dicom_node.selector")


def check_inference(value: str | None, where: str) -> None:
    """Refuse an ``inference`` that is neither ``local`` nor a well-formed ``triton://`` URL."""
    from medclass.remote import is_remote, parse_url

    if value is None or value == "local":
        return
    if not isinstance(value, str) or not is_remote(value):
        raise MedClassError(f"{where} = {value!r} is not an inference backend",
                            'write "local" or "triton://HOST[:PORT]/MODEL"')
    parse_url(value)

ROUTE_KEYS = frozenset({"checkpoint", "modality", "body_part", "sop_class", "series_description", "inference",
                        "priority"})


@dataclass
class SeriesInfo:
    """What selection looks at, from the first instance of a series."""

    series_uid: str
    modality: str = ""
    body_part: str = ""
    sop_class: str = ""
    series_description: str = ""

    @classmethod
    def from_dataset(cls, ds: Any) -> SeriesInfo:
        return cls(str(ds.SeriesInstanceUID), str(ds.get("Modality", "") or ""),
                   str(ds.get("BodyPartExamined", "") or ""), str(ds.get("SOPClassUID", "") or ""),
                   str(ds.get("SeriesDescription", "") or ""))


@dataclass
class Route:
    """One ``[[routes]]`` rule."""

    checkpoint: str
    modality: str | None = None
    body_part: str | None = None
    sop_class: str | None = None
    series_description: str | None = None
    inference: str | None = None  # None: the node's inference
    priority: str | None = None  # "urgent" or "routine" (None: routine unless the header says urgent)

    def __post_init__(self) -> None:
        check_inference(self.inference, "[[routes]] inference")
        if self.priority not in (None, "urgent", "routine"):
            raise MedClassError(f"[[routes]] priority = {self.priority!r} is not a priority",
                                'write priority = "urgent" or "routine"')
        if self.series_description is not None:
            try:
                self._regex = re.compile(self.series_description)
            except re.error as e:
                raise MedClassError(f"[[routes]] series_description {self.series_description!r} is not a valid "
                                    f"regular expression ({e})", "fix the rule in node.toml") from None

    def matches(self, s: SeriesInfo) -> bool:
        if self.modality is not None and s.modality.upper() != self.modality.upper():
            return False
        if self.body_part is not None and s.body_part.upper() != self.body_part.upper():
            return False
        if self.sop_class is not None and self.sop_class not in (s.sop_class, UID(s.sop_class).name):
            return False
        if self.series_description is not None and not self._regex.search(s.series_description):
            return False
        return True


class SeriesSelector:
    """Pick the checkpoint(s) for the series of a study.

    Parameters
    ----------
    routes : list of dict
        ``[[routes]]`` rules (see the module docstring).
    default_checkpoint : str, optional
        For a rule without ``checkpoint``, and for every series when there are no rules.
    classify_any_modality : bool, default False
        Without rules, classify every image series with the default checkpoint, whatever
        modality and body part its card says it was trained on.
    inference : str, default "local"
        Where a model runs when its rule does not say (``triton://...``: a Triton server).
    """

    def __init__(self, routes: list[dict[str, str]] | None = None, default_checkpoint: str | None = None,
                 classify_any_modality: bool = False, inference: str = "local") -> None:
        self.routes = []
        for r in routes or []:
            unknown = set(r) - ROUTE_KEYS
            if unknown:
                raise MedClassError(f"[[routes]] rule {r} has unknown keys {sorted(unknown)}",
                                    f"use only {sorted(ROUTE_KEYS)}")
            self.routes.append(Route(**{"checkpoint": default_checkpoint, **r}))
        self.default = default_checkpoint
        self.classify_any_modality = classify_any_modality
        self.inference = inference or "local"
        if not self.routes and not self.default:
            raise MedClassError("no model to classify with",
                                "pass --checkpoint model.pt, add [[routes]] to node.toml, or run 'medclass quickstart'")
        self._default_card: dict[str, Any] | None = None
        #: Why each series of the last :meth:`plan` was not selected (series UID -> reason).
        self.skipped: dict[str, str] = {}

    @property
    def default_card(self) -> dict[str, Any]:
        if self._default_card is None:
            from medclass.checkpoint import read_card

            self._default_card = read_card(self.default)
        return self._default_card

    def reason(self, series: SeriesInfo) -> str | None:
        """Why ``series`` is not classified (one line with a remedy), or ``None`` when it is."""
        if self.routes:
            if any(r.matches(series) for r in self.routes):
                return None
            return (f"no model matches series {series.series_uid} (modality {series.modality or '?'}, body part "
                    f"{series.body_part or '?'}); add a rule to [[routes]] in node.toml")
        if self.classify_any_modality:
            return None
        card = self.default_card
        why = scope_mismatch(card.get("data"), series.modality, series.body_part)
        if why is None:
            return None
        model = f"{card.get('model', {}).get('name', 'the model')} ({Path(self.default).name})"
        return (f"series {series.series_uid} {why.replace('the model', 'model ' + model, 1)}; add a [[routes]] "
                "rule or set classify_any_modality = true")

    def select(self, series: SeriesInfo) -> str | None:
        """The checkpoint for one series, or ``None`` (logged with a remedy) when it is not to be classified."""
        if self.routes:
            for r in self.routes:
                if r.matches(series):
                    return r.checkpoint
        elif self.reason(series) is None:
            return self.default
        why = self.reason(series)
        self.skipped[series.series_uid] = why
        log.info("%s", why)
        return None

    def _route_of(self, checkpoint: str) -> Route | None:
        return next((r for r in self.routes if r.checkpoint == checkpoint), None)

    def inference_of(self, checkpoint: str) -> str:
        """Where ``checkpoint``'s model runs: its route's ``inference``, else the node's."""
        r = self._route_of(checkpoint)
        return (r.inference if r is not None and r.inference else None) or self.inference

    def priority_of(self, checkpoint: str) -> str:
        """The queue priority its route asks for (``routine`` without one)."""
        r = self._route_of(checkpoint)
        return (r.priority if r is not None else None) or "routine"

    def plan(self, series: list[SeriesInfo]) -> dict[str, list[str]]:
        """Checkpoint → series UIDs it classifies (a study may use several models).

        The series left out, with their reasons, are in :attr:`skipped`.
        """
        self.skipped = {}
        out: dict[str, list[str]] = {}
        for s in series:
            ck = self.select(s)
            if ck:
                out.setdefault(ck, []).append(s.series_uid)
        return out
