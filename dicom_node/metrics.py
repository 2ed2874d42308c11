"""Prometheus metrics of one node (its own registry, so that tests can run several nodes)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class NodeMetrics:
    """Counters and latencies; ``serve(port)`` exposes them on ``/metrics``."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.instances = Counter("medclass_node_instances_received", "Instances stored and acknowledged",
                                 ["modality"], registry=r)
        self.bytes = Counter("medclass_node_received_bytes", "Bytes of acknowledged instances", registry=r)
        self.rejected = Counter("medclass_node_instances_rejected", "Objects refused or set aside", ["reason"],
                                registry=r)
        self.store_seconds = Histogram("medclass_node_store_seconds", "Time to persist one instance durably",
                                       registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, 1))
        self.studies = Counter("medclass_node_studies", "Studies by outcome", ["outcome"], registry=r)
        self.inference_seconds = Histogram("medclass_node_inference_seconds", "Time to classify one study",
                                           registry=r)
        self.images_classified = Counter("medclass_node_images_classified", "Images through a model", registry=r)
        self.images_prepared = Counter("medclass_node_images_prepared",
                                       "Images a model read: 'arrival' from the cache filled as they arrived, "
                                       "'inline' decoded when the study was classified", ["where"], registry=r)
        self.sent = Counter("medclass_node_sent", "Objects delivered", ["kind"], registry=r)
        self.send_failures = Counter("medclass_node_send_failures", "Failed send attempts (retried)", ["kind"],
                                     registry=r)
        self.turnaround_seconds = Histogram("medclass_node_turnaround_seconds",
                                            "From the study becoming stable to its SR delivered", registry=r,
                                            buckets=(.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300))
        self.inference_up = Gauge("medclass_node_inference_up",
                                  "1 while the remote inference server answers, 0 while it is down (studies wait "
                                  "in ready and are retried with a backoff)", ["inference"], registry=r)
        self.outbox_pending = Gauge("medclass_node_outbox_pending", "Objects waiting to be sent", registry=r)
        self._server = None

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Start the ``/metrics`` HTTP endpoint; returns the port (``0`` picks a free one)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
