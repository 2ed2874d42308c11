"""The SlicerMedClass DICOM node: receive studies, classify them, return a coded SR, route them.

``medclass node`` runs it (see ``dicom_node/README.md``). The pieces, in the order an
instance meets them:

- :mod:`dicom_node.scp` — C-ECHO and C-STORE service class provider (pynetdicom);
- :mod:`dicom_node.fastpath` — the C-STORE fast path (event-driven association loops, header walk,
  direct file meta), tied to the pinned pynetdicom and switched by ``fast_path``;
- :mod:`dicom_node.ingest` — more processes accepting associations on the same port;
- :mod:`dicom_node.spool` — durable instance store (the spool and quarantine files);
- :mod:`dicom_node.jobs` — the SQLite job database: study states and their transitions, the outbox;
- :mod:`dicom_node.assembler` — a study is complete when nothing arrived for ``stable_seconds``;
- :mod:`dicom_node.selector` — series selection rules pick the model(s);
- :mod:`dicom_node.worker` — batched inference off the association threads;
- :mod:`dicom_node.sender` — C-STORE of the SR and forwarded studies, with retries and a dead letter;
- :mod:`dicom_node.router` — triage rules (``malignant >= 0.8`` → forward to ``URGENT``);
- :mod:`dicom_node.status` and :mod:`dicom_node.metrics` — what the administrator sees (and ``node resend``);
- :mod:`dicom_node.desk` — the triage desk, a web page of the worklist, the reports and the actions on them;
- :mod:`dicom_node.tls` — the TLS contexts from ``[tls]`` (incoming and the node's own sends);
- :mod:`dicom_node.config` and :mod:`dicom_node.destination` — ``node.toml`` and ``AET@HOST:PORT``;
- :mod:`dicom_node.node` — the running node: all of the above wired together, started and stopped;
- :mod:`dicom_node.cli` — ``medclass node`` (``status``, ``resend``), reached from ``medclass`` through
  the ``medclass.commands`` entry point (the core never imports the node).

The real peers the tests and benchmarks start (Orthanc, dcmtk and pynetdicom storescp, the
node itself, in subprocesses on loopback) live in ``tests/peers.py``, outside the package.
"""

from dicom_node.config import NodeConfig, load_config

__all__ = ["NodeConfig", "load_config"]
