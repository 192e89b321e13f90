"""SGLang frontend programs the demo, the examples, the tests and the benchmarks share."""

from lava_sglang.frontend.programs import multi_question_qa

__all__ = ["multi_question_qa"]
