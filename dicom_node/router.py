"""Triage routing: forward a study to other AEs by its classification result.

A ``[[forward]]`` rule reads ``when = "<class> <op> <number>"`` (ops ``>=``, ``>``,
``<=``, ``<``, ``==``) or ``when = "label == <class>"``, and ``to = "AET@HOST:PORT"``;
``priority = "high"`` sends the C-STOREs with HIGH priority.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

from dicom_node.destination import Destination
from medclass.errors import MedClassError

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}
_WHEN = re.compile(r"^\s*(?P<name>.+?)\s*(?P<op>>=|<=|==|>|<)\s*(?P<value>.+?)\s*$")
PRIORITIES = {"low": 2, "medium": 0, "high": 1}  # DIMSE priority values


@dataclass
class ForwardRule:
    """``when`` → forward the study to ``to``."""

    when: str
    to: str
    priority: str = "medium"

    def __post_init__(self) -> None:
        m = _WHEN.match(self.when)
        if not m:
            raise MedClassError(f"[[forward]] when = {self.when!r} is not '<class> >= <number>'",
                                'write e.g. when = "malignant >= 0.8" or when = "label == malignant"')
        self.name, self.op, self.value = m["name"], m["op"], m["value"]
        if self.name != "label":
            try:
                self.threshold = float(self.value)
            except ValueError:
                raise MedClassError(f"[[forward]] when = {self.when!r}: {self.value!r} is not a number",
                                    "compare a probability with a number between 0 and 1") from None
        if self.priority not in PRIORITIES:
            raise MedClassError(f"[[forward]] priority {self.priority!r} is unknown", f"use one of {list(PRIORITIES)}")
        self.destination = Destination.parse(self.to, "[[forward]] to")

    def fires(self, probabilities: dict[str, float], label: str | list[str]) -> bool:
        """Whether the rule applies to one result (a class the model lacks never fires)."""
        if self.name == "label":
            labels = [label] if isinstance(label, str) else list(label)
            return (self.value in labels) if self.op == "==" else False
        p = probabilities.get(self.name)
        return p is not None and _OPS[self.op](p, self.threshold)


class StudyRouter:
    """All ``[[forward]]`` rules of the node."""

    def __init__(self, rules: list[dict[str, Any]] | None = None) -> None:
        self.rules = [ForwardRule(**r) for r in rules or []]

    def destinations(self, probabilities: dict[str, float], label: str | list[str]) -> list[ForwardRule]:
        """The rules that fire for a result (each destination once)."""
        seen, out = set(), []
        for r in self.rules:
            if r.fires(probabilities, label) and str(r.destination) not in seen:
                seen.add(str(r.destination))
                out.append(r)
        return out
