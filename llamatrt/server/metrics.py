"""Prometheus metrics of a server, in a registry of its own (prometheus_client)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llamatrt_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("llamatrt_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("llamatrt_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "llamatrt_time_to_first_token_seconds",
            "From submission to the first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "llamatrt_inter_token_latency_seconds",
            "Between two tokens of a running request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("llamatrt_queue_depth", "Requests waiting for a free row", registry=r)
        self.active_rows = Gauge("llamatrt_active_rows", "Rows of the batch holding a request", registry=r)
        # vLLM's prefix_cache_queries / prefix_cache_hits: prompt tokens looked up, and found
        self.prefix_queries = Counter(
            "llamatrt_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_hits = Counter(
            "llamatrt_prefix_cache_hits", "Prompt tokens found in the prefix cache (not prefilled)", registry=r
        )
        self.prefix_bytes = Gauge("llamatrt_prefix_cache_bytes", "Memory the prefix cache's blocks hold", registry=r)
        self.constrained = Counter(
            "llamatrt_constrained_requests", "Requests held to a grammar (response_format)", registry=r
        )
        self.validation_failures = Counter(
            "llamatrt_constrained_validation_failures",
            "Constrained answers that did not satisfy their schema (refused, never sent; must stay 0)",
            registry=r,
        )
        self.mask_seconds = Counter(
            "llamatrt_grammar_mask_seconds", "Time spent filling and applying grammar token masks", registry=r
        )
        self._seen: dict[Counter, float] = {}  # the loop's running totals, as last read

    def token_time(self, step: Any, since_last: float, first: bool) -> None:
        if step.token_id is None:
            return
        if first:
            self.ttft.observe(step.elapsed_s)
        else:
            self.itl.observe(since_last)

    def observe_queue(self, scheduler: Any) -> None:
        self.queue_depth.set(scheduler.waiting)
        self.active_rows.set(scheduler.active_rows)
        # the loop's own counters, read here: the loop thread stays metrics-free
        if scheduler.prefix is not None:
            self._follow(self.prefix_queries, scheduler.prefix.stats.queries)
            self._follow(self.prefix_hits, scheduler.prefix.stats.hits)
            self.prefix_bytes.set(scheduler.prefix.bytes)
        if scheduler.grammars is not None:
            self._follow(self.constrained, scheduler.grammars.stats.constrained_requests)
            self._follow(self.validation_failures, scheduler.grammars.stats.validation_failures)
            self._follow(self.mask_seconds, scheduler.grammars.stats.mask_seconds)

    def _follow(self, counter: Counter, total: float) -> None:
        """Advance `counter` to `total`, a running total kept elsewhere."""
        before = self._seen.get(counter, 0.0)
        if total > before:
            counter.inc(total - before)
            self._seen[counter] = total

    def finished(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
