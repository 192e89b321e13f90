"""The fork program the serving benchmark and the examples send, against a recording backend (no server)."""

from __future__ import annotations

import threading

import pytest
from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.chat_template import get_chat_template

from lava_sglang.frontend import multi_question_qa


class RecordingBackend(BaseBackend):
    """Answers every generation with the end of its prompt; records commits and generations."""

    def __init__(self):
        super().__init__()
        self.chat_template = get_chat_template("default")
        self.lock = threading.Lock()
        self.commits: list[str] = []
        self.prompts: list[str] = []

    def commit_lazy_operations(self, s):
        with self.lock:
            self.commits.append(s.text_)

    def generate(self, s, sampling_params):
        with self.lock:
            self.prompts.append(s.text_)
        return f"answer to {s.text_[-3:]}", {"prompt_tokens": len(s.text_), "cached_tokens": 0}


class FailingBackend(RecordingBackend):
    def generate(self, s, sampling_params):
        raise ConnectionError("the server went away")


def test_a_failed_branch_raises_its_error():
    with pytest.raises(RuntimeError, match="a question's branch failed: the server went away"):
        multi_question_qa.run(prefix="DOCUMENT", suffixes=[" Q0", " Q1"], max_tokens=4, backend=FailingBackend())


@pytest.mark.parametrize("num_questions", [1, 2, 4])
def test_the_document_is_committed_once_and_every_question_gets_its_branch(num_questions):
    backend = RecordingBackend()
    suffixes = [f" Q{i}" for i in range(num_questions)]
    state = multi_question_qa.run(prefix="DOCUMENT", suffixes=suffixes, max_tokens=4, backend=backend)
    # fork(1) would commit nothing; a lone question still commits its document.
    assert backend.commits == ["DOCUMENT"]
    assert sorted(backend.prompts) == sorted("DOCUMENT" + suffix for suffix in suffixes)
    assert state["answers"] == [f"answer to {suffix[-3:]}" for suffix in suffixes]
    assert [meta["prompt_tokens"] for meta in state["meta_info"]] == [len("DOCUMENT") + len(s) for s in suffixes]
