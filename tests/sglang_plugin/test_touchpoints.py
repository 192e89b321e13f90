"""The places the plugin touches SGLang exist in the installed version (touchpoints.py)."""

from __future__ import annotations

import pkgutil

from lava_sglang.sglang_plugin import touchpoints


def hook_targets() -> dict[str, str]:
    """Every dotted SGLang path touchpoints.py names, by constant name."""
    return {name: value for name, value in vars(touchpoints).items()
            if name.isupper() and isinstance(value, str) and value.startswith("sglang.")}


def test_every_hook_target_resolves_as_sglangs_hook_registry_resolves_it():
    """HookRegistry.apply_hooks only logs a target it cannot resolve and starts the server
    without that hook (the idle compression, request validation, /server_info would be
    silently gone): an upgrade that moves one must fail here."""
    targets = hook_targets()
    assert {"ADD_CLI_ARGS", "FROM_CLI_ARGS", "VALIDATE_REQUEST", "PARALLEL_GROUP", "SCHEDULER_IDLE",
            "INTERNAL_STATE"} <= set(targets)
    unresolved = []
    for name, target in targets.items():
        owner_path, attribute = target.rsplit(".", 1)  # as HookRegistry._apply_target splits it
        if not callable(getattr(pkgutil.resolve_name(owner_path), attribute, None)):
            unresolved.append(name)
    assert unresolved == []
