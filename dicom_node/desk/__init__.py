"""The triage desk: a web page of what the node received, decided and sent, and what needs a hand.

Served by the node itself (:class:`DeskServer`, a uvicorn server in a thread of the node's
process) when ``web_port`` is set; see "The triage desk" in ``dicom_node/README.md``.
:mod:`dicom_node.desk.app` holds the pages and actions, :mod:`dicom_node.desk.auth` the users,
sessions and login rate limit.
"""

from dicom_node.desk.server import DeskServer

__all__ = ["DeskServer"]
