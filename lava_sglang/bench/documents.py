"""Benchmark documents built from text already on every machine: Python's `pydoc_data`
topics (the language reference, real English prose with code), with planted facts.

Everything is derived from a seed, so a run is reproducible. No dataset hub is needed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

SYSTEM_PROMPT = "You are a helpful assistant. Answer questions about the document the user gives."

FACT_TEMPLATE = "The special code for {key} is {code}."
RETRIEVAL_QUESTION = "What is the special code for {key}? Answer with the number only."
CODE_DIGITS = 7
#: Answer tokens a retrieval question gets: "The special code for <key> is <code>." with a
#: key of several tokens; 16 cut some codes short, a right answer then counted wrong.
RETRIEVAL_ANSWER_TOKENS = 24
#: A code the answer has finished: a non-digit follows it, so no later token makes it a longer
#: number (where generating a retrieval answer can stop).
FINISHED_CODE_PATTERN = re.compile(rf"(?<!\d)\d{{{CODE_DIGITS}}}\D")


def code_finished(decode: Callable[[list[int]], str]) -> Callable[[list[int]], bool]:
    """The stop rule of a retrieval answer's generation (`stop_when`): true once the answer's
    tokens, decoded by `decode` (a tokenizer's), hold a finished number of exactly 7 digits, the
    answer to grade (a longer number does not stop it)."""
    return lambda tokens: FINISHED_CODE_PATTERN.search(decode(tokens)) is not None


def names_code(text: str, code: str) -> bool:
    """Whether the first whole number of the code's length in `text` is `code` ("91234567" does
    not name 1234567, nor does "7654321 or 1234567"): how the benchmarks and the demo grade a
    retrieval answer. The quality benchmark's answers stop at that number (`code_finished`);
    the server's run to their token cap, and a list of codes is graded by its first."""
    first = re.search(rf"(?<!\d)\d{{{len(code)}}}(?!\d)", text)
    return first is not None and first.group() == code

# Keys are "<adjective> <noun>" pairs: distinct, easy to ask about, absent from the topics.
_ADJECTIVES = [
    "amber", "silver", "crimson", "velvet", "golden", "hollow", "frozen", "quiet", "copper", "scarlet",
    "misty", "iron", "jade", "lunar", "coral", "ivory", "cobalt", "maple", "ashen", "dusky",
]
_NOUNS = [
    "falcon", "lantern", "harbor", "meadow", "compass", "orchard", "glacier", "violin", "beacon", "canyon",
    "otter", "quarry", "thimble", "walrus", "saddle", "kettle", "pagoda", "marble", "tundra", "heron",
]
#: Planted facts a document can hold: each has a key of its own.
MAX_FACTS = min(len(_ADJECTIVES), len(_NOUNS))

FIDELITY_QUESTIONS = [
    "Summarize the document in two sentences.",
    "What is the main topic of the first section?",
    "Explain one rule that the document describes.",
    "Which Python statements or expressions does the document discuss?",
    "What does the document say about exceptions or errors?",
    "Give an example of code from the document and explain it.",
    "What is described in the last part of the document?",
    "List three technical terms used in the document.",
]


@dataclass
class Question:
    text: str
    answer: str | None = None  # the planted code, for retrieval questions


@dataclass
class Document:
    """A document, the facts planted in it and the questions asked about it."""

    text: str
    questions: list[Question] = field(default_factory=list)


def prompt_parts(document: str, question: str) -> tuple[str, str]:
    """Chat-formatted (prefix, suffix): the prefix holds the document and is shared by every
    question, the suffix holds one question and the assistant turn's opening."""
    prefix = (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
              f"<|im_start|>user\nDocument:\n{document}\n")
    suffix = f"\nQuestion: {question}<|im_end|>\n<|im_start|>assistant\n"
    return prefix, suffix


def _paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        paragraphs.extend(part.strip() for part in topics[name].split("\n\n") if part.strip())
    return paragraphs


def _filler(rng: random.Random, count_tokens: Callable[[str], int], target_tokens: int) -> list[str]:
    """Consecutive paragraphs from a random place in the reference, about target_tokens long."""
    paragraphs = _paragraphs()
    start = rng.randrange(len(paragraphs))
    chosen, tokens = [], 0
    index = start
    while tokens < target_tokens:
        paragraph = paragraphs[index % len(paragraphs)]
        chosen.append(paragraph)
        tokens += count_tokens(paragraph) + 1
        index += 1
    return chosen


def retrieval_documents(
    count_tokens: Callable[[str], int], target_tokens: int, facts_per_document: list[int], seed: int
) -> list[Document]:
    """One document per entry of `facts_per_document`, each with that many planted facts at
    random paragraph boundaries and one question per fact."""
    rng = random.Random(seed)
    documents = []
    for num_facts in facts_per_document:
        if num_facts > MAX_FACTS:
            raise ValueError(f"at most {MAX_FACTS} facts per document, got {num_facts}")
        fact_tokens = count_tokens(FACT_TEMPLATE.format(key="amber falcon", code="1234567")) + 1
        paragraphs = _filler(rng, count_tokens, target_tokens - num_facts * fact_tokens)
        if len(paragraphs) - 1 < num_facts:
            raise ValueError(f"a {target_tokens}-token document has room for {max(len(paragraphs) - 1, 0)} planted "
                             f"facts, not {num_facts}: give more tokens or fewer facts")
        # No word is shared by two keys of one document, so a key is never half right.
        keys = [f"{adjective} {noun}" for adjective, noun in
                zip(rng.sample(_ADJECTIVES, num_facts), rng.sample(_NOUNS, num_facts))]
        codes = [str(rng.randrange(10 ** (CODE_DIGITS - 1), 10**CODE_DIGITS)) for _ in keys]
        # Distinct boundaries before the last paragraph (the tail is the observation window).
        slots = sorted(rng.sample(range(len(paragraphs) - 1), num_facts), reverse=True)
        for slot, key, code in zip(slots, keys, codes):
            paragraphs.insert(slot + 1, FACT_TEMPLATE.format(key=key, code=code))
        questions = [Question(RETRIEVAL_QUESTION.format(key=key), answer=code) for key, code in zip(keys, codes)]
        documents.append(Document(text="\n\n".join(paragraphs), questions=questions))
    return documents


def fidelity_documents(
    count_tokens: Callable[[str], int], target_tokens: int, num_documents: int, questions_per_document: int,
    seed: int,
) -> list[Document]:
    """Plain reference text with open questions (answers are judged against the full cache)."""
    rng = random.Random(seed)
    documents = []
    for _ in range(num_documents):
        text = "\n\n".join(_filler(rng, count_tokens, target_tokens))
        questions = [Question(text) for text in rng.sample(FIDELITY_QUESTIONS, questions_per_document)]
        documents.append(Document(text=text, questions=questions))
    return documents
