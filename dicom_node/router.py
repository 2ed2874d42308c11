"""Triage routing: forward a study to other AEs by its classification result.

A ``[[forward]]`` rule has ``to = "AET@HOST:PORT"`` (or a DICOMweb root URL, or the name of a
``[[dicomweb]]`` table, :mod:`dicom_node.destination`), optionally ``priority = "high"``
(the C-STOREs go with HIGH priority), and ``when``, one of:

``"<class> <op> <number>"``
    A (calibrated) probability against a number in [0, 1]; ops ``>=``, ``>``, ``<=``,
    ``<``, ``==``.
``"label == <class>"``
    The predicted label.
``"<class> at sensitivity >= <target>"`` (or ``specificity``)
    An operating point: the threshold is the one that reached the target on the
    model's validation split (its card's ROC, :mod:`medclass.calibration`); it fires
    when the class's probability is ``>=`` that threshold. At start the node logs the
    threshold and the held-out sensitivity and specificity it gives.
``"uncertain"``
    The study's conformal prediction set (at the node's ``coverage``) holds more, or
    fewer, than one class: the model cannot decide; e.g. to a human-review AE.

Rules are checked against the node's models at start (:meth:`StudyRouter.bind`): a class
no model has, or an operating point on a model without a stored ROC, stops the node.
"""

from __future__ import annotations

import difflib
import logging
import operator
import re
from dataclasses import dataclass
from typing import Any

from dicom_node.destination import parse_destination
from medclass.errors import MedClassError

log = logging.getLogger("dicom_node.router")

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}
_WHEN = re.compile(r"^\s*(?P<name>.+?)\s*(?P<op>>=|<=|==|>|<)\s*(?P<value>.+?)\s*$")
_AT = re.compile(r"^\s*(?P<name>.+?)\s+at\s+(?P<metric>sensitivity|specificity)\s*>=\s*(?P<value>.+?)\s*$",
                 re.IGNORECASE)
UNCERTAIN = "uncertain"
PRIORITIES = {"low": 2, "medium": 0, "high": 1}  # DIMSE priority values
_EXAMPLES = ('write e.g. when = "malignant >= 0.8", "label == malignant", "malignant at sensitivity >= 0.95" '
             'or "uncertain"')


def _number(rule: str, text: str, remedy: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise MedClassError(f"[[forward]] when = {rule!r}: {text!r} is not a number", remedy) from None


@dataclass
class ForwardRule:
    """``when`` → forward the study to ``to`` (see the module docstring)."""

    when: str
    to: str
    priority: str = "medium"

    def __post_init__(self) -> None:
        self.metric: str | None = None  # "sensitivity" / "specificity" for an operating point
        self.threshold: float | None = None
        self.target: float | None = None
        #: Per checkpoint, the operating point chosen on its validation ROC (filled by StudyRouter.bind).
        self.operating_points: dict[str, dict[str, Any]] = {}
        at = _AT.match(self.when)
        m = _WHEN.match(self.when)
        if self.when.strip().lower() == UNCERTAIN:
            self.name, self.op, self.value = UNCERTAIN, "", ""
        elif at:
            self.name, self.op, self.value, self.metric = at["name"], ">=", at["value"], at["metric"].lower()
            self.target = _number(self.when, self.value, f'write e.g. when = "{self.name} at {self.metric} >= 0.95"')
            if not 0 < self.target <= 1:
                raise MedClassError(f"[[forward]] when = {self.when!r}: a {self.metric} target must be in (0, 1]",
                                    f'write e.g. when = "{self.name} at {self.metric} >= 0.95"')
        elif m:
            self.name, self.op, self.value = m["name"], m["op"], m["value"]
            if self.name != "label":
                self.threshold = _number(self.when, self.value, "compare a probability with a number between 0 and 1")
                if not 0 <= self.threshold <= 1:
                    raise MedClassError(f"[[forward]] when = {self.when!r}: a probability is between 0 and 1, so "
                                        f"{self.threshold:g} makes the rule meaningless",
                                        "use a threshold in [0, 1], e.g. 0.8")
        else:
            raise MedClassError(f"[[forward]] when = {self.when!r} is not '<class> >= <number>' nor another rule",
                                _EXAMPLES)
        if self.priority not in PRIORITIES:
            raise MedClassError(f"[[forward]] priority {self.priority!r} is unknown", f"use one of {list(PRIORITIES)}")
        self.destination = parse_destination(self.to, "[[forward]] to")

    @property
    def class_name(self) -> str | None:
        """The class the rule reads (``None`` for ``uncertain``)."""
        if self.name == UNCERTAIN:
            return None
        return self.value if self.name == "label" else self.name

    def fires(self, probabilities: dict[str, float], label: str | list[str], checkpoint: str | None = None,
              prediction_set: list[str] | None = None) -> bool:
        """Whether the rule applies to one result (a class the model lacks never fires).

        ``checkpoint`` picks the operating point of the model that gave the result;
        ``prediction_set`` is its conformal set (``None``: the model has none, never uncertain).
        """
        if self.name == UNCERTAIN:
            return prediction_set is not None and len(prediction_set) != 1
        if self.name == "label":
            labels = [label] if isinstance(label, str) else list(label)
            return (self.value in labels) if self.op == "==" else False
        p = probabilities.get(self.name)
        if p is None:
            return False
        if self.metric:
            op = self.operating_points.get(checkpoint) if checkpoint is not None else None
            if op is None and checkpoint is None and len(self.operating_points) == 1:
                op = next(iter(self.operating_points.values()))
            return op is not None and p >= op["threshold"]
        return _OPS[self.op](p, self.threshold)


class StudyRouter:
    """All ``[[forward]]`` rules of the node.

    Parameters
    ----------
    rules : list of dict
        The ``[[forward]]`` tables.
    cards : dict of str to dict, optional
        The model card of every checkpoint the node classifies with; given, the rules are
        checked against them and the operating points chosen (:meth:`bind`).
    """

    def __init__(self, rules: list[dict[str, Any]] | None = None,
                 cards: dict[str, dict[str, Any]] | None = None) -> None:
        self.rules = [ForwardRule(**r) for r in rules or []]
        if cards is not None:
            self.bind(cards)

    def bind(self, cards: dict[str, dict[str, Any]]) -> None:
        """Check every rule against the node's models; choose and log the operating points.

        Raises
        ------
        MedClassError
            A rule names a class no model has (naming the closest class), an operating
            point on a model whose card stores no validation ROC, or ``uncertain`` with
            no model storing conformal scores.
        """
        from medclass.calibration import operating_point

        classes = {ck: list(card["task"]["classes"]) for ck, card in cards.items()}
        every = sorted({c for cs in classes.values() for c in cs})
        for rule in self.rules:
            name = rule.class_name
            if name is None:
                if not any((card.get("calibration") or {}).get("conformal") for card in cards.values()):
                    raise MedClassError(f"[[forward]] when = {rule.when!r}: no model of the node stores conformal "
                                        "scores, so no study can be uncertain",
                                        "run 'medclass calibrate --checkpoint MODEL.pt' (or retrain) first")
                continue
            having = [ck for ck, cs in classes.items() if name in cs]
            if not having:
                close = difflib.get_close_matches(name, every, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else f"the models' classes are {every}"
                raise MedClassError(f"[[forward]] when = {rule.when!r} names the class {name!r}, which no model "
                                    "of the node has, so the rule could never fire", hint)
            if rule.metric:
                for ck in having:
                    try:
                        op = operating_point(cards[ck], name, rule.metric, rule.target)
                    except MedClassError as e:
                        raise MedClassError(f"[[forward]] when = {rule.when!r} with {ck}: {e.message}",
                                            e.remedy) from None
                    rule.operating_points[ck] = op
                    log.info("[[forward]] %s -> %s: threshold %.6f for %s (validation sensitivity %s, specificity "
                             "%s; held-out sensitivity %s, specificity %s)", rule.when, rule.destination,
                             op["threshold"], ck, _fmt(op["val_sensitivity"]), _fmt(op["val_specificity"]),
                             _fmt(op["test_sensitivity"]), _fmt(op["test_specificity"]))

    def operating_points(self, checkpoint: str) -> list[dict[str, Any]]:
        """The operating points the rules use for ``checkpoint`` (for the report)."""
        return [r.operating_points[checkpoint] for r in self.rules if checkpoint in r.operating_points]

    def destinations(self, probabilities: dict[str, float], label: str | list[str], checkpoint: str | None = None,
                     prediction_set: list[str] | None = None) -> list[ForwardRule]:
        """The rules that fire for a result (each destination once)."""
        seen, out = set(), []
        for r in self.rules:
            if r.fires(probabilities, label, checkpoint, prediction_set) and str(r.destination) not in seen:
                seen.add(str(r.destination))
                out.append(r)
        return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
