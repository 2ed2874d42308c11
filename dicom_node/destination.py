"""A DICOM application entity the node sends to: ``AET@HOST:PORT``.

Its own module, so that the router, the sender and the configuration all use it
without importing one another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from medclass.errors import MedClassError

_AE_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Destination:
    """A DICOM application entity to send to: ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str = "destination") -> Destination:
        """Parse ``AET@HOST:PORT``.

        Raises
        ------
        MedClassError
            The text is not of that form.
        """
        m = _AE_RE.match(str(text).strip())
        if not m or not 0 < int(m["port"]) < 65536:
            raise MedClassError(f"{what} {text!r} is not AET@HOST:PORT", "write it like ORTHANC@127.0.0.1:4242")
        return cls(m["aet"].strip(), m["host"], int(m["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"
