"""Prometheus metrics: one ``CollectorRegistry`` per app, ``paligemma_`` names, base units.

Why a per-app registry: tests build many apps in one process and prometheus_client refuses to register a
name twice in one registry. ``/metrics`` still serves prometheus_client's default ``REGISTRY`` too (in
the same response), because vLLM's in-process engine records its ``vllm:*`` metrics there. No name here
may contain "vllm": vLLM unregisters default-registry collectors whose names match at every engine start.

Labels carry only bounded, server-chosen values: the route path from a fixed list (anything else is
``other``) and the HTTP status code. Never prompts, filenames, client addresses or image sizes.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ENDPOINTS = (
    *("/detect", "/segment", "/vqa", "/caption", "/ocr", "/v1/chat/completions", "/v1/models", "/"),
    *("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"),
)
INFERENCE_ENDPOINTS = ("/detect", "/segment", "/vqa", "/caption", "/ocr", "/v1/chat/completions")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120)
DECODE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
DETECTION_BUCKETS = (0, 1, 2, 3, 5, 8, 13, 20, 50, 100)


def endpoint_label(path: str) -> str:
    """The metrics label for a request path: a known route or ``other``."""
    return path if path in ENDPOINTS else "other"


class Metrics:
    """Every collector the service records, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "paligemma_http_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "paligemma_http_request_duration_seconds",
            "Time from request start to the end of the response, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("paligemma_engine_queue_depth", "Requests waiting in the engine", registry=r)
        self.in_flight = Gauge("paligemma_engine_requests_in_flight", "Requests the engine is running", registry=r)
        self.batch_size = Histogram(
            "paligemma_engine_batch_size", "Requests per model generate call", buckets=BATCH_BUCKETS, registry=r
        )
        self.generated_tokens = Counter(
            "paligemma_generated_tokens", "Tokens generated, by endpoint", ["endpoint"], registry=r
        )
        self.prompt_tokens = Counter(
            "paligemma_prompt_tokens", "Prompt tokens (image tokens included), by endpoint", ["endpoint"], registry=r
        )
        self.decode_seconds = Histogram(
            "paligemma_image_decode_seconds",
            "Time to decode one upload and resize it to the model's input (in an upload worker)",
            buckets=DECODE_BUCKETS,
            registry=r,
        )
        self.detections = Histogram(
            "paligemma_detections_per_request", "Detections returned by /detect", buckets=DETECTION_BUCKETS, registry=r
        )
        self.detections_dropped = Counter(
            "paligemma_detections_dropped",
            "Detections parsed but not returned (no label and several objects requested)",
            ["reason"],
            registry=r,
        )
        self.aborted = Counter(
            "paligemma_aborted_requests",
            "Engine requests aborted before they finished, by reason (deadline_exceeded, client_closed)",
            ["reason"],
            registry=r,
        )
        self.model_info = Gauge("paligemma_model_info", "The served model and engine", ["model", "engine"], registry=r)
        for endpoint in INFERENCE_ENDPOINTS:  # known series exist at 0 before the first request
            self.generated_tokens.labels(endpoint)
            self.prompt_tokens.labels(endpoint)
            self.requests.labels(endpoint, "200")
        self.detections_dropped.labels("no_label")
        for reason in ("deadline_exceeded", "client_closed"):
            self.aborted.labels(reason)

    def watch_engine(self, stats: Callable[[], dict[str, float]]) -> None:
        """Read the engine's queue depth and in-flight count at scrape time."""
        self.queue_depth.set_function(lambda: stats().get("queue_depth", 0.0))
        self.in_flight.set_function(lambda: stats().get("in_flight", 0.0))

    def unwatch_engine(self) -> None:
        self.queue_depth.set_function(lambda: 0.0)
        self.in_flight.set_function(lambda: 0.0)

    def exposition(self) -> bytes:
        """This app's metrics followed by prometheus_client's default registry, in one text response."""
        return generate_latest(self.registry) + generate_latest(REGISTRY)
