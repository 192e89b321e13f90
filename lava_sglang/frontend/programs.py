"""Multi-question document QA as an SGLang frontend program.

The document prefix is added once and the program forks one branch per question: SGLang
commits the prefix with a `max_new_tokens=0` request before the branches run, which is the
prefix `--kv-policy` compresses once and every branch reuses.
"""

from __future__ import annotations

import sglang as sgl


def _branch_error(branch):
    """The error a joined branch stopped on, or None. Read once its worker thread has ended
    (`join()` ends it; a failed one ends by itself once it has stored its error), not through
    `ProgramState.error()`, whose sync can wait forever on the stop `join()` queued for a
    worker that had already stopped on its error."""
    executor = branch.stream_executor
    if executor.use_thread:
        executor.worker.join()
    return executor.error_


@sgl.function
def multi_question_qa(s, prefix: str, suffixes: list[str], max_tokens: int = 32):
    """prefix: the shared text (e.g. system prompt + document); suffixes: one per question
    (the question and the assistant turn's opening). Sets s["answers"], s["meta_info"]."""
    s += prefix
    # SGLang 0.5.23's fork() looks at the text before it syncs the stream, so without this
    # sync the prefix may still be queued and fork() skips committing it.
    s.text()
    # fork(1) commits nothing (SGLang commits the prefix only for two or more branches), so a
    # lone question forks two branches and leaves the second idle: the document is still
    # committed, compressed and reused by later programs.
    branches = s.fork(max(len(suffixes), 2))
    used = [branches[i] for i in range(len(suffixes))]
    for branch, suffix in zip(used, suffixes):
        branch += suffix + sgl.gen("answer", max_tokens=max_tokens, temperature=0)
    branches.join()
    for branch in used:  # SGLang keeps a branch's error in its state: raise it, not a KeyError on its answer
        error = _branch_error(branch)
        if error is not None:
            raise RuntimeError(f"a question's branch failed: {error}") from error
    s["answers"] = [branch["answer"] for branch in used]
    s["meta_info"] = [branch.get_meta_info("answer") for branch in used]
