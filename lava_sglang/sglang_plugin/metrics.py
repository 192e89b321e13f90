"""Prometheus metrics of the compressed store, on SGLang's `/metrics` (`--enable-metrics`).

SGLang runs prometheus_client in multiprocess mode: the scheduler process writes its
samples to PROMETHEUS_MULTIPROC_DIR and the HTTP server aggregates them, so metrics created
here, in the scheduler, appear next to SGLang's own `sglang:*` ones.

With several scheduler processes the HTTP server sums them. Under tensor parallel every
rank compresses the same prefix, holding its share of the KV heads: the per-prefix events
(tokens, compression time, evictions) and the entry count are recorded by TP rank 0
alone, as SGLang records its own, and the bytes by every rank (`lava:store_bytes` and
`lava:bytes_saved` are the server's totals); `lava:kept_ratio` is then rank 0's heads'.
Data-parallel ranks hold different prefixes: everything sums over them.
"""

from __future__ import annotations

import functools
import logging

from lava_sglang.store import CompressedStore, StoreEntry

logger = logging.getLogger(__name__)

# Buckets for a prefix's token count, its kept ratio and its compression time.
TOKEN_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
RATIO_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _recorded_safely(method):
    """Run a recording method only with metrics on, and never let it raise: it is called
    after the cache changed (a compressed node added, one evicted), and a failure to write a
    sample (a full or unwritable multiprocess directory) must not read as the change failing."""

    @functools.wraps(method)
    def record(self, *args) -> None:
        if not self.enabled:
            return
        try:
            method(self, *args)
        except Exception:
            logger.exception("lava: recording the store's metrics failed; the cache is unaffected")

    return record


class StoreMetrics:
    """Per compressed prefix: tokens, kept ratio, bytes saved, compression time; and the
    store's current size. Without --enable-metrics every method does nothing (the store's
    statistics are not even read: that walks every entry). records_events: False on TP
    ranks other than 0, which then report only the bytes they hold."""

    def __init__(self, enabled: bool, labels: dict[str, str], records_events: bool = True):
        self.enabled = enabled
        self.records_events = records_events
        if not enabled:
            return
        from prometheus_client import Counter, Gauge, Histogram  # after SGLang set the multiproc dir

        names = list(labels)
        self.labels = labels
        self.prefix_tokens = Histogram("lava:compressed_prefix_tokens", "Tokens of each compressed prefix.",
                                       names, buckets=TOKEN_BUCKETS)
        self.kept_ratio = Histogram("lava:kept_ratio", "Kept rows / (layers x KV heads x tokens) per prefix.",
                                    names, buckets=RATIO_BUCKETS)
        self.compress_seconds = Histogram("lava:compress_seconds", "Time to score, plan and store one prefix.",
                                          names, buckets=SECONDS_BUCKETS)
        self.bytes_saved = Counter("lava:bytes_saved", "KV bytes of the rows compression dropped, summed over "
                                   "prefixes.", names)
        self.evictions = Counter("lava:evicted_prefixes", "Compressed prefixes evicted.", names)
        self.store_entries = Gauge("lava:store_entries", "Compressed prefixes held now.", names,
                                   multiprocess_mode="livesum")
        self.store_bytes = Gauge("lava:store_bytes", "KV bytes of the rows the compressed prefixes keep now (the "
                                 "pool slots they borrow hold a few cells more).", names, multiprocess_mode="livesum")

    @_recorded_safely
    def compressed(self, entry: StoreEntry, store: CompressedStore) -> None:
        if self.records_events:
            self.prefix_tokens.labels(**self.labels).observe(entry.prefix_len)
            self.kept_ratio.labels(**self.labels).observe(entry.kept_ratio)
            self.compress_seconds.labels(**self.labels).observe(entry.compress_seconds)
        self.bytes_saved.labels(**self.labels).inc(entry.bytes_saved)  # this rank's heads: summed over ranks
        self.store_changed(store)

    @_recorded_safely
    def evicted(self, store: CompressedStore) -> None:
        if self.records_events:
            self.evictions.labels(**self.labels).inc()
        self.store_changed(store)

    @_recorded_safely
    def store_changed(self, store: CompressedStore) -> None:
        store_stats = store.stats()
        if self.records_events:
            self.store_entries.labels(**self.labels).set(store_stats["entries"])
        self.store_bytes.labels(**self.labels).set(store_stats["bytes_stored"])
