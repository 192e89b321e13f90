"""patches/sglang-0.5.23-kv-policy.patch: it applies to the installed SGLang, and it declares the
same --kv-* options, with the same defaults and policies, as the plugin."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from lava_sglang.sglang_plugin.config import (FLAGS, FORK, KV_POLICIES, OBSERVE_FLAG_READERS, RECONSTRUCT,
                                              SERVER_OBSERVE_SOURCES, SHARED, TAIL, KvPolicyConfig, default_window,
                                              parse_budget, parse_triggers)

PATCH = Path(__file__).resolve().parents[2] / "patches" / "sglang-0.5.23-kv-policy.patch"
FIELDS_FILE = "sglang/srt/arg_groups/fields/memory.py"
FIELD_ORDER_FILE = "sglang/srt/arg_groups/field_order.py"
KV_FIELDS = tuple(FLAGS)  # kv_policy, kv_budget, ..., kv_compress_on


def site_packages() -> Path:
    """The directory holding the installed `sglang` package (found without importing it)."""
    spec = importlib.util.find_spec("sglang")
    assert spec is not None and spec.origin, "sglang is not installed"
    return Path(spec.origin).parent.parent


def patched_files() -> list[str]:
    return re.findall(r"^\+\+\+ b/(\S+)", PATCH.read_text(), flags=re.M)


def added_lines(path: str) -> list[str]:
    """The lines the patch adds to `path`, without their leading '+'."""
    sections = re.split(r"^(?=--- )", PATCH.read_text(), flags=re.M)
    section = next(s for s in sections if re.search(rf"^\+\+\+ b/{re.escape(path)}\s*$", s, flags=re.M))
    return [line[1:] for line in section.splitlines() if line.startswith("+") and not line.startswith("+++")]


def help_text(field: ast.AnnAssign) -> str:
    """The help of a field declared A[T, "help"] or A[T, Arg(help=..., ...)]."""
    metadata = field.annotation.slice.elts[1]
    if isinstance(metadata, ast.Constant):
        return metadata.value
    return next(ast.literal_eval(keyword.value) for keyword in metadata.keywords if keyword.arg == "help")


def run_patch(*args: str) -> subprocess.CompletedProcess:
    patch = shutil.which("patch")
    if patch is None:
        pytest.skip("the `patch` program is not installed (apt-get install patch)")
    # --force: never stop to ask (a missing file or an already-applied hunk fails instead).
    return subprocess.run([patch, "--force", "-p1", "--input", str(PATCH), *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)


def test_patch_applies_to_the_installed_sglang():
    files = patched_files()
    assert FIELDS_FILE in files and FIELD_ORDER_FILE in files, files
    result = run_patch("--dry-run", "-d", str(site_packages()))
    output = result.stdout + result.stderr
    version = importlib.metadata.version("sglang")
    assert result.returncode == 0, f"patch --dry-run failed against sglang {version} ({site_packages()}):\n{output}"
    for path in files:
        assert f"checking file {path}" in output, output
    assert "FAILED" not in output and "offset" not in output.lower() and "fuzz" not in output.lower(), output


def test_patched_sources_compile(tmp_path):
    """Applied to copies of the files it touches, the patch gives valid Python."""
    for path in patched_files():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(site_packages() / path, tmp_path / path)
    result = run_patch("-d", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    for path in patched_files():
        compile((tmp_path / path).read_text(), path, "exec")


def test_patch_declares_the_fields_like_the_plugin():
    block = ast.parse(textwrap.dedent("\n".join(added_lines(FIELDS_FILE))))
    declared = {node.target.id: node for node in block.body if isinstance(node, ast.AnnAssign)}
    assert tuple(declared) == KV_FIELDS
    defaults = {name: ast.literal_eval(node.value) for name, node in declared.items()}
    expected = KvPolicyConfig()
    assert defaults["kv_policy"] == expected.policy
    assert parse_budget(defaults["kv_budget"]) == expected.budget
    assert defaults["kv_min_prefix"] == expected.min_prefix
    # --kv-window: None, resolved by the hook as the plugin's default_window does.
    hook = "\n".join(added_lines("sglang/srt/arg_groups/kv_cache_hook.py"))
    assert defaults["kv_window"] is None
    assert (f'window = {default_window(RECONSTRUCT, (FORK,))} if cfg.kv_observe == "{RECONSTRUCT}" and '
            f'"{SHARED}" not in triggers else {default_window(TAIL, (FORK,))}') in hook
    assert 'declare_resolution(server_args, "handle_kv_policy", kv_window=window)' in hook
    # --kv-alpha and --kv-pool-kernel: None when not given, so that a spec's own value is not taken for a flag's.
    assert (defaults["kv_alpha"], defaults["kv_pool_kernel"]) == (None, expected.pool_kernel)
    assert "cfg.kv_alpha is not None and" in hook
    assert parse_triggers(defaults["kv_compress_on"]) == expected.compress_on
    assert defaults["kv_observe"] == expected.observe
    # --kv-observe-*: None until given, so that the plugin refuses one the source does not read even at its
    # default; the help states the default.
    for name in OBSERVE_FLAG_READERS:
        assert defaults[f"kv_{name}"] is None, name
        assert f"Default {FLAGS[f'kv_{name}'][1]}." in help_text(declared[f"kv_{name}"]), name
        assert f"cfg.kv_{name} is not None and" in hook or f"cfg.kv_{name} not in (None, " in hook, name
    for name, node in declared.items():  # A[T, "help"] or A[T, Arg(help=...)]: a CLI flag with help text
        metadata = node.annotation.slice.elts[1]
        assert isinstance(metadata, (ast.Constant, ast.Call)), name
    # --kv-policy takes specs (lava:layer_budget=entropy): the hook checks the name, listing them all.
    listed = ast.literal_eval(re.search(r"policies = (\(.*?\))", hook).group(1))
    assert sorted(listed) == sorted(KV_POLICIES)
    arg = declared["kv_observe"].annotation.slice.elts[1]
    choices = next(ast.literal_eval(kw.value) for kw in arg.keywords if kw.arg == "choices")
    assert tuple(choices) == SERVER_OBSERVE_SOURCES
    # ServerArgs' positional order lists built-in fields explicitly, new ones appended.
    order = [line.strip() for line in added_lines(FIELD_ORDER_FILE)]
    assert order == [f'"{name}",' for name in KV_FIELDS]


def test_patch_wires_the_policy_to_the_lava_radix_cache():
    added = "\n".join(line for path in patched_files() for line in added_lines(path))
    assert 'declare_resolution(server_args, "handle_kv_policy", radix_cache_backend="lava")' in added
    assert "run_hook(handle_kv_policy, server_args)" in added
    for flag, *_ in FLAGS.values():
        assert f"{flag} must" in added or flag == "--kv-policy", f"no validation error names {flag}"
