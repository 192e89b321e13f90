"""lava-sglang: LAVa KV-cache compression inside SGLang's radix-tree prefix cache."""

__version__ = "0.1.0"
