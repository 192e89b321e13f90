import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter. Triton reads this variable
# when it is first imported (transformers imports it early), so it is set before anything.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2_path():
    """The converted SmolLM2 checkpoint (converted on first use, cached outside the repo)."""
    from lava_sglang.model import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def runtime(smollm2_path):
    from lava_sglang.reference import ReferenceRuntime

    return ReferenceRuntime.load(smollm2_path, dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_model(smollm2_path):
    """The same checkpoint with stock transformers attention: the exactness oracle."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)
