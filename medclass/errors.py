"""User-facing errors.

A :class:`MedClassError` is a mistake the user can fix (a missing file, an unknown
model name, a corrupt DICOM). Its message says what is wrong *and* what to do; the
command line prints it on one line and exits non-zero, without a traceback.
"""

from __future__ import annotations


class MedClassError(Exception):
    """An error caused by the user's input, with a remedy in its message.

    Parameters
    ----------
    message : str
        What is wrong, e.g. ``"cannot read 'x.dcm': not a DICOM file"``.
    remedy : str, optional
        What the user can do about it; appended after ``"; "``.
    """

    def __init__(self, message: str, remedy: str | None = None) -> None:
        self.message = message
        self.remedy = remedy
        super().__init__(f"{message}; {remedy}" if remedy else message)
