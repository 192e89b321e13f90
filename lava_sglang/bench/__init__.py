"""Benchmarks: quality on the reference runtime (serving benchmarks come with the plugin)."""
