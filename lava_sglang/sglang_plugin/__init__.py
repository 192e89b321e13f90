"""LAVa as a plugin for SGLang: server-side pieces and the tools that launch SGLang servers.

`register` is the `sglang.srt.plugins` entry point (see pyproject.toml); SGLang calls it in
the launcher and in every process it spawns. Importing this package imports no SGLang.
"""


def register() -> None:
    from lava_sglang.sglang_plugin.plugin import register as register_plugin

    register_plugin()
