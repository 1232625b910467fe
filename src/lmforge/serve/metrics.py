"""The server's counters and histograms, rendered in Prometheus' text exposition format (GET /metrics).

Written by hand rather than with prometheus_client: a handful of series, and one process, so no registry or
multiprocess mode is needed. The server updates them from its event loop only, so no lock is needed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

# Seconds: time to first token spans prefill (milliseconds to seconds); the gap between tokens is one decode step.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, a sum and a count."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{upper}"}} {n}' for upper, n in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        return out + [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    """Requests by route and status, tokens in and out, finished requests by reason, TTFT and inter-token time."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.finished: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.inter_token = Histogram(ITL_BUCKETS)

    def request(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def done(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        """One generation ended (`reason`: stop, length or cancelled) after these many tokens in and out."""
        self.finished[reason] += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def render(self, running: int, waiting: int, in_flight: int, drafted: int = 0, accepted: int = 0) -> str:
        """The exposition text; the gauges and the engine's draft counters are read by the caller (the engine's
        queues and stats, the server's requests)."""
        lines = ["# HELP lmforge_requests_total HTTP requests answered, by route and status.",
                 "# TYPE lmforge_requests_total counter"]
        lines += [f'lmforge_requests_total{{route="{r}",status="{s}"}} {n}'
                  for (r, s), n in sorted(self.requests.items())]
        lines += ["# HELP lmforge_generations_total Generations ended, by finish reason.",
                  "# TYPE lmforge_generations_total counter"]
        lines += [f'lmforge_generations_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
        for name, value, kind, text in (
            ("lmforge_prompt_tokens_total", self.prompt_tokens, "counter", "Prompt tokens read."),
            ("lmforge_completion_tokens_total", self.completion_tokens, "counter", "Tokens generated."),
            ("lmforge_running_requests", running, "gauge", "Requests in the engine's running batch."),
            ("lmforge_waiting_requests", waiting, "gauge", "Requests waiting for a slot in the batch."),
            ("lmforge_http_requests_in_flight", in_flight, "gauge", "Generation and embedding requests open now."),
            ("lmforge_draft_tokens_total", drafted, "counter", "Tokens drafted for speculative decoding (--draft)."),
            ("lmforge_draft_tokens_accepted_total", accepted, "counter", "Drafted tokens the model confirmed."),
        ):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        for name, hist, text in (("lmforge_time_to_first_token_seconds", self.ttft, "From request to first token."),
                                 ("lmforge_inter_token_seconds", self.inter_token, "Between consecutive tokens.")):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram", *hist.lines(name)]
        return "\n".join(lines) + "\n"
