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


class InferenceUnavailable(MedClassError):
    """The remote inference server cannot be reached or does not serve the model now.

    Unlike a plain :class:`MedClassError` (a refusal the user must fix, such as a model
    card that differs from the server's), this one means *retry later*: the server is
    down, restarting or unreachable. The DICOM node puts the study back in its queue;
    the command line and the MONAI Label app report it on one line.

    Parameters
    ----------
    url : str
        The inference URL (``triton://host:port/model``).
    reason : str
        What failed, e.g. the client library's message.
    """

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"inference server {url} is unavailable ({reason})",
                         "start it, or check the address; the request can be retried")
