"""HF-transformers runtime with the same policies: compress once, answer many (the oracle)."""

from lava_sglang.reference.runtime import CompressedPrefix, Observation, PrefixCapture, ReferenceRuntime

__all__ = ["CompressedPrefix", "Observation", "PrefixCapture", "ReferenceRuntime"]
