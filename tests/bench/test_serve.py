"""The serving benchmark's pure parts: workload, statistics, summary and report (no server)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from lava_sglang.bench import serve
from lava_sglang.bench.documents import Document, Question, prompt_parts
from lava_sglang.bench.serve import (MEMORY_BOUND, ServeConfig, add_arguments, check_loopback, combined_store,
                                     config_from_args, memory_bound_capacity, policy_server_args)
from lava_sglang.bench.serve_report import by_visit, comparison, markdown, write_serving_report
from lava_sglang.bench.serve_workload import (MISS_SLACK, Visit, build_workload, is_correct, is_miss,
                                              latency_summary, percentile, program_inputs, store_peaks, summarize,
                                              visit_records)
from lava_sglang.sglang_plugin.server_process import ServerExited

# --- workload -----------------------------------------------------------------------------------


def test_grouped_workload_asks_each_document_in_one_program_by_default():
    visits = build_workload([3, 2], questions_per_visit=0, order="grouped")
    assert [(v.document, v.questions, v.round) for v in visits] == [(0, (0, 1, 2), 0), (1, (0, 1), 0)]
    assert [v.index for v in visits] == [0, 1]


def test_interleaved_workload_brings_every_document_back_after_all_the_others():
    visits = build_workload([4, 4, 3], questions_per_visit=2, order="interleaved")
    assert [(v.document, v.round) for v in visits] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert [v.questions for v in visits] == [(0, 1), (0, 1), (0, 1), (2, 3), (2, 3), (2,)]
    # Every question asked exactly once.
    asked = sorted((v.document, q) for v in visits for q in v.questions)
    assert asked == [(d, q) for d, n in enumerate([4, 4, 3]) for q in range(n)]


def test_documents_get_their_facts_cycled_to_the_question_count():
    from lava_sglang.bench.serve import make_documents

    class Tokenizer:  # a word is a token
        def __call__(self, text):
            return type("Encoding", (), {"input_ids": text.split()})()

    documents = make_documents(Tokenizer(), ServeConfig(documents=2, questions=22, context=4000, seed=1))
    assert len(documents) == 2 and all(len(d.questions) == 22 for d in documents)
    for document in documents:
        assert all(q.answer in document.text for q in document.questions)
        assert len({q.text for q in document.questions}) == 20  # at most 20 facts, then cycled
        assert document.questions[20] is document.questions[0]
    assert documents[0].text != documents[1].text


def test_workload_rejects_bad_input():
    with pytest.raises(ValueError, match="order"):
        build_workload([2], 1, "random")
    with pytest.raises(ValueError, match="question"):
        build_workload([2, 0], 1, "grouped")
    with pytest.raises(ValueError, match="questions_per_visit"):
        build_workload([2], -1, "grouped")


def _document() -> Document:
    return Document("Some text. The special code for amber falcon is 1234567.",
                    [Question("What is the special code for amber falcon?", "1234567"),
                     Question("What is the special code for jade otter?", "7654321")])


def test_program_inputs_share_one_prefix():
    document = _document()
    prefix, suffixes = program_inputs(document, Visit(0, 0, (1, 0), 0))
    assert prefix == prompt_parts(document.text, "")[0]
    assert suffixes == [prompt_parts("", document.questions[q].text)[1] for q in (1, 0)]
    assert all(prefix + s == "".join(prompt_parts(document.text, document.questions[q].text))
               for s, q in zip(suffixes, (1, 0)))


def test_grading_and_misses():
    assert is_correct(" The code is 1234567.", "1234567") is True
    assert is_correct("123456", "1234567") is False
    assert is_correct("91234567", "1234567") is False  # a longer number is not the code
    assert is_correct("code 1234567, not 7654321", "1234567") is True
    assert is_correct("7654321, or 1234567", "1234567") is False  # a list of codes is graded by its first
    assert is_correct("room 12, code 1234567", "1234567") is True  # numbers of other lengths are not codes
    assert is_correct("anything", None) is None
    assert not is_miss(1000, 999, 1000)  # the last prompt token is always recomputed
    assert not is_miss(1000, 1000 - MISS_SLACK, 1000)
    assert is_miss(1000, 1000 - MISS_SLACK - 1, 1000)
    assert is_miss(1030, 0, 1000)
    assert not is_miss(None, 0, 1000)


def test_memory_bound_defaults_and_capacity():
    parser = add_arguments(__import__("argparse").ArgumentParser())
    config = config_from_args(parser.parse_args(["--memory-bound"]))
    assert config.policies == MEMORY_BOUND["policies"] and config.order == "interleaved"
    assert (config.documents, config.questions, config.questions_per_visit, config.clients) == (10, 8, 2, 1)
    config = config_from_args(parser.parse_args(["--memory-bound", "--documents", "5", "--order", "grouped",
                                                 "--clients", "3"]))
    assert (config.documents, config.order, config.clients) == (5, "grouped", 3)
    plain = config_from_args(parser.parse_args([]))
    # Two visits per document, round-robin: a deferred policy's copy is read by the second.
    assert len(plain.policies) == 7 and plain.order == "interleaved" and plain.questions_per_visit == 2
    assert plain.clients == 2
    assert memory_bound_capacity([1000, 1100], 3) == 3584  # 3 * 1100 + 256, rounded up to 64
    assert memory_bound_capacity([1000, 1100], 3) % 64 == 0


def test_flags_for_started_servers_are_refused_with_url_and_times_must_be_positive(capsys):
    parser = add_arguments(__import__("argparse").ArgumentParser())
    url = ["--url", "http://127.0.0.1:30000"]
    assert config_from_args(parser.parse_args(url + ["--memory-bound"])).url == url[1]
    for flags in (["--policies", "lava"], ["--budget", "0.1"], ["--max-total-tokens", "4096"],
                  ["--server-args=--kv-window 64"]):
        with pytest.raises(ValueError, match=f"{flags[0].split('=')[0]} set the servers this command starts"):
            config_from_args(parser.parse_args(url + flags))
    for flag in ("--max-seconds", "--sample-interval"):
        for bad in ("0", "-1", "inf"):
            with pytest.raises(SystemExit):
                parser.parse_args([flag, bad])
        assert "finite number > 0" in capsys.readouterr().err
    # Beyond what a thread wait takes (a traceback mid-run), or a poll without pause, refused before any server starts.
    with pytest.raises(ValueError, match=r"--max-seconds must be in \(0, 604800\] \(a week\), got 1e\+10"):
        ServeConfig(max_seconds=1e10).validate()
    for bad in (0, 0.01, 901):
        with pytest.raises(ValueError, match=r"--sample-interval must be in \[0.1, --max-seconds \(900\)\] seconds"):
            ServeConfig(max_seconds=900, sample_interval=bad).validate()
    ServeConfig(max_seconds=900, sample_interval=900).validate()


def test_a_url_is_a_servers_address():
    parser = add_arguments(__import__("argparse").ArgumentParser())
    assert config_from_args(parser.parse_args(["--url", "http://127.0.0.1:30000/"])).url == "http://127.0.0.1:30000"
    for bad in ("localhost:30000", "ftp://127.0.0.1:30000", "http://127.0.0.1:30000/generate"):
        with pytest.raises(ValueError, match=r"--url must be a server's address, http\(s\)://host:port"):
            config_from_args(parser.parse_args(["--url", bad])).validate()


def test_a_url_that_does_not_name_its_model_is_refused(monkeypatch):
    monkeypatch.setattr(serve.requests, "get", lambda url, timeout: _Response(404, {"detail": "Not Found"}))
    with pytest.raises(ValueError, match="did not say which model it serves .* HTTP 404"):
        serve.served_model_path("http://127.0.0.1:30000")


def test_a_url_run_records_the_checkpoint_its_server_reported(monkeypatch, smollm2_path):
    # serve-reference answers a --url run with that checkpoint (recorded_model).
    from lava_sglang.bench.serve_reference import recorded_model

    monkeypatch.setattr(serve.requests, "get", lambda url, timeout: _Response(200, {"model_path": str(smollm2_path)}))
    monkeypatch.setattr(serve, "server_urls", lambda url: [url])
    facts = {"kv_policy": {"policy": "lava", "budget": 0.2}, "unreadable_answers": []}
    monkeypatch.setattr(serve, "server_facts", lambda url: facts)
    monkeypatch.setattr(serve, "run_workload", lambda url, *args: {"policy": args[-2]})
    config = ServeConfig(url="http://127.0.0.1:30000", documents=1, questions=1, questions_per_visit=1, context=256)
    result = serve.run_benchmark(config, progress=False)
    assert recorded_model(result["meta"]) == (str(smollm2_path), True)
    # The report is of the server's policy alone, not a partial run of the default list.
    assert result["meta"]["config"]["policies"] == ["lava"] and result["meta"]["config"]["budget"] == 0.2
    facts["unreadable_answers"] = ["--incremental-streaming-output"]
    with pytest.raises(ValueError, match="runs with --incremental-streaming-output: the programs' streamed answers"):
        serve.run_benchmark(config, progress=False)


def test_a_url_run_whose_server_would_leave_the_documents_uncompressed_is_refused(monkeypatch, smollm2_path):
    # It would report stock SGLang's behaviour under the policy's name, as a run that starts its servers would.
    monkeypatch.setattr(serve.requests, "get", lambda url, timeout: _Response(200, {"model_path": str(smollm2_path)}))
    monkeypatch.setattr(serve, "server_urls", lambda url: [url])
    monkeypatch.setattr(serve, "run_workload", lambda *args: pytest.fail("the workload ran"))
    config = ServeConfig(url="http://127.0.0.1:30000", documents=1, questions=1, questions_per_visit=1, context=256)
    for kv_policy, refused in (({"policy": "lava", "budget": 0.2, "window": 8, "min_prefix": 4096,
                                 "compress_on": ["fork"], "pending": 0},
                                r"below the server at http://127.0.0.1:30000's --kv-min-prefix 4096"),
                               ({"policy": "lava", "budget": 1.0, "window": 8, "min_prefix": 64},
                                r"its --kv-budget 1.0 with the server at .*'s --kv-window 8 keeps every token")):
        monkeypatch.setattr(serve, "server_facts", lambda url: {"kv_policy": kv_policy, "unreadable_answers": []})
        with pytest.raises(ValueError, match=refused):
            serve.run_benchmark(config, progress=False)
    assert not serve.served_policy(None).enabled  # a server without the plugin: stock SGLang, nothing to check


def test_server_flags_a_policys_server_would_refuse_stop_the_run_before_any_server_starts():
    config = ServeConfig(policies=["none", "lava", "kvzip"], server_args=["--kv-observe", "branches"])
    documents = [1000, 1010]
    with pytest.raises(ValueError, match="the kvzip server would refuse them: --kv-policy kvzip: .*--kv-observe"):
        serve.check_server_flags(config, capacity=None, cuda=False, prefix_tokens=documents)
    serve.check_server_flags(replace(config, policies=["none", "lava", "snapkv"]), capacity=None, cuda=False,
                             prefix_tokens=documents)
    alpha = ServeConfig(policies=["none", "ada_snapkv", "lava"], server_args=["--kv-alpha", "0.3"])
    with pytest.raises(ValueError, match="the lava server would refuse them: --kv-alpha 0.3"):
        serve.check_server_flags(alpha, capacity=4096, cuda=False, prefix_tokens=documents)
    # SGLang's own options too, as the launcher refuses them with a policy (stock SGLang takes them).
    for sglang_option, refused in ((["--page-size", "16"], "--page-size > 1"),
                                   (["--kv-cache-dtype", "fp8_e5m2"], "--kv-cache-dtype fp8_e5m2"),
                                   (["--disable-radix-cache"], "--disable-radix-cache"),
                                   (["--attention-backend=fa3"], "--attention-backend fa3")):
        with pytest.raises(ValueError, match=f"the lava server would refuse them: --kv-policy lava cannot run with "
                                             f"{re.escape(refused)}"):
            serve.check_server_flags(replace(config, policies=["none", "lava"], server_args=sglang_option),
                                     capacity=None, cuda=False, prefix_tokens=documents)
        serve.check_server_flags(replace(config, policies=["none"], server_args=sglang_option), capacity=None,
                                 cuda=False, prefix_tokens=documents)
    # As the launcher parses them: an abbreviation is its flag, a bad value or an unknown flag a one-line refusal.
    for sglang_option, refused in ((["--page-siz", "16"], "--page-size > 1"),
                                   (["--page-size", "abc"], "argument --page-size: invalid int value: 'abc'"),
                                   (["--no-such-flag"], "unrecognized arguments: --no-such-flag")):
        with pytest.raises(ValueError, match=f"the none server would refuse them: .*{re.escape(refused)}|"
                                             f"the lava server would refuse them: .*{re.escape(refused)}"):
            serve.check_server_flags(replace(config, policies=["none", "lava"], server_args=sglang_option),
                                     capacity=None, cuda=False, prefix_tokens=documents)


def test_stock_sglang_gets_the_server_args_without_the_plugins_flags():
    # It refuses them (no policy); SGLang's own flags, --kv-cache-dtype included, reach every server.
    config = ServeConfig(policies=["none", "lava"], server_args=["--kv-observe", "tail", "--chunked-prefill-size",
                                                                 "256", "--kv-window=16", "--kv-cache-dtype", "auto"])
    stock = serve.policy_server_args("none", config, capacity=None, cuda=False)
    assert stock[stock.index("--dtype") + 2:] == ["--chunked-prefill-size", "256", "--kv-cache-dtype", "auto"]
    lava = serve.policy_server_args("lava", config, capacity=None, cuda=False)
    assert lava[-7:] == config.server_args
    serve.check_server_flags(config, capacity=None, cuda=False, prefix_tokens=[1000])
    # A policy that scores nothing refuses the --kv-observe-* flags: streamingllm gets the rest.
    chunk = ServeConfig(policies=["none", "lava", "streamingllm"],
                        server_args=["--kv-observe-chunk", "1024", "--kv-observe-wait=60", "--kv-window", "16"])
    streaming = serve.policy_server_args("streamingllm", chunk, capacity=None, cuda=False)
    assert streaming[-2:] == ["--kv-window", "16"] and "--kv-observe-wait=60" not in streaming
    serve.check_server_flags(chunk, capacity=None, cuda=False, prefix_tokens=[1000])


def test_a_run_whose_servers_would_leave_a_document_uncompressed_is_refused_before_any_server_starts():
    # It would measure stock SGLang under each policy's name.
    config = ServeConfig(policies=["none", "lava"])
    with pytest.raises(ValueError, match="a document of 200 tokens is below the lava server's --kv-min-prefix 256"):
        serve.check_server_flags(config, capacity=None, cuda=False, prefix_tokens=[1000, 200])
    with pytest.raises(ValueError, match="below the lava server's --kv-min-prefix 2048"):
        serve.check_server_flags(replace(config, server_args=["--kv-min-prefix", "2048"]), capacity=None,
                                 cuda=False, prefix_tokens=[1000])
    serve.check_server_flags(replace(config, server_args=["--kv-min-prefix", "128"]), capacity=None, cuda=False,
                             prefix_tokens=[200])
    serve.check_server_flags(replace(config, policies=["none"]), capacity=None, cuda=False, prefix_tokens=[200])
    with pytest.raises(ValueError, match="--budget 1.0 with the lava server.s --kv-window 8 keeps every token of a "
                                         "999-token document"):
        serve.check_server_flags(replace(config, budget=1.0), capacity=None, cuda=False, prefix_tokens=[1000])


def test_flags_that_would_do_nothing_or_relabel_a_run_are_refused():
    parser = add_arguments(__import__("argparse").ArgumentParser())
    with pytest.raises(ValueError, match="--budget: --policies none compresses nothing"):
        config_from_args(parser.parse_args(["--policies", "none", "--budget", "0.5"]))
    assert config_from_args(parser.parse_args(["--policies", "none", "lava", "--budget", "0.5"])).budget == 0.5
    for flags in (["--resident-documents", "4"], ["--memory-bound", "--resident-documents", "4",
                                                  "--max-total-tokens", "9000"]):
        with pytest.raises(ValueError, match="--resident-documents sizes the pool of --memory-bound runs"):
            config_from_args(parser.parse_args(flags))
    assert config_from_args(parser.parse_args(["--memory-bound", "--resident-documents", "4"])).resident_documents == 4
    assert config_from_args(parser.parse_args(["--memory-bound"])).resident_documents == 3
    # Where it sizes nothing, the run does not record it.
    for argv in (["--memory-bound", "--max-total-tokens", "9000"], ["--memory-bound", "--url", "http://127.0.0.1:1"],
                 []):
        assert config_from_args(parser.parse_args(argv)).resident_documents is None
    with pytest.raises(ValueError, match="--server-args '--kv-window \"64': No closing quotation"):
        config_from_args(parser.parse_args(['--server-args=--kv-window "64']))
    # SGLang's parser takes an unambiguous prefix of a flag: --kv-budg 0.5 would run 0.5 in a run labelled 0.2.
    for server_args, replacement in (("--kv-budget 0.1", "--budget"), ("--kv-policy=lava", "--policies"),
                                     ("--max-total-tokens 9000", "--max-total-tokens"), ("--kv-budg 0.5", "--budget"),
                                     ("--kv-pol=snapkv", "--policies"), ("--max-total 9000", "--max-total-tokens"),
                                     ("--model-path /other", "--model"), ("--port 1", "--url"),
                                     ("--config run.yaml", "the flags themselves")):
        with pytest.raises(ValueError, match=f"this command sets it for each server; use {replacement}"):
            config_from_args(parser.parse_args([f"--server-args={server_args}"])).validate()
    with pytest.raises(ValueError, match="--server-args --kv-observe-v: an abbreviation of a plugin flag; write one "
                                         "of --kv-observe-view in full"):
        config_from_args(parser.parse_args(["--server-args=--kv-observe-v chunk"])).validate()
    # SGLang's own --kv-* flags are not the plugin's: they pass.
    allowed = config_from_args(parser.parse_args(["--server-args=--kv-observe-view chunk --mem-fraction-static 0.5 "
                                                  "--kv-cache-dtype bf16"]))
    allowed.validate()
    assert allowed.server_args == ["--kv-observe-view", "chunk", "--mem-fraction-static", "0.5", "--kv-cache-dtype",
                                   "bf16"]


def test_a_flush_the_server_refuses_is_tried_again_then_raised(monkeypatch):
    from types import SimpleNamespace

    answers = []

    def post(url, timeout):
        answers.append(url)
        ok = len(answers) == 3  # busy twice (a request still queued), then idle
        return SimpleNamespace(ok=ok, status_code=200 if ok else 400, text="" if ok else "Cache not flushed: busy")

    monkeypatch.setattr(serve.requests, "post", post)
    monkeypatch.setattr(serve.time, "sleep", lambda seconds: None)
    serve.flush_cache("http://127.0.0.1:1")
    assert answers == ["http://127.0.0.1:1/flush_cache"] * 3
    answers.clear()
    with pytest.raises(TimeoutError, match=r"/flush_cache refused 2 times over 4 s \(HTTP 400: Cache not flushed: "
                                           r"busy\): the server is busy"):
        serve.flush_cache("http://127.0.0.1:1", attempts=2)


def test_clients_stop_after_their_current_visit_when_one_is_interrupted():
    import threading
    import time

    done, started_second = [], threading.Event()

    def run_visit(visit):
        if visit == 0:  # Ctrl-C reaches the run while the other client is inside its visit
            started_second.wait(5)
            raise KeyboardInterrupt
        started_second.set()
        time.sleep(0.2)
        done.append(visit)

    with pytest.raises(KeyboardInterrupt):
        serve.run_clients(range(100), 2, time.perf_counter() + 60, run_visit)
    assert done == [1]  # the visit under way finished; no other started

    def second_client_fails(visit):
        if visit == 1:  # while the main thread waits on the first client
            raise RuntimeError("a bad visit")
        time.sleep(0.05)
        done.append(visit)

    done.clear()
    with pytest.raises(RuntimeError, match="a bad visit"):
        serve.run_clients(range(1000), 2, time.perf_counter() + 60, second_client_fails)
    assert len(done) <= 2  # the first client finished the visit under way, then stopped
    finished, daemons = [], []

    def record(visit):
        daemons.append(threading.current_thread().daemon)
        finished.append(visit)

    serve.run_clients(range(5), 2, time.perf_counter() + 60, record)
    assert sorted(finished) == [0, 1, 2, 3, 4]
    # Daemon threads: a visit a silent server holds does not keep the process alive after the run.
    assert daemons == [True] * 5
    serve.run_clients(range(5), 2, time.perf_counter() - 1, finished.append)  # past the deadline: none starts
    assert len(finished) == 5


def test_a_visit_a_silent_server_holds_is_abandoned_after_the_bound():
    import threading
    import time

    # A program's requests have no timeout: without the bound the run would wait for ever.
    answered, ended = threading.Event(), []

    def run_visit(visit):
        if visit == 0:
            answered.wait(30)  # the server never answers
        ended.append(visit)

    began = time.perf_counter()
    serve.run_clients(range(4), 2, time.perf_counter() + 0.2, run_visit, stuck_seconds=0.3)
    assert time.perf_counter() - began < 5 and sorted(ended) == [1, 2, 3]  # visit 0 still held
    answered.set()


def test_a_visit_that_ends_after_the_run_closed_is_left_out_and_one_under_way_counts_as_failed():
    results = serve.VisitResults()
    for _ in range(3):
        results.begin()
    assert results.end({"visit": 0}, [{"visit": 0, "question": 0}])
    assert results.end(error="visit 1: RuntimeError: refused")
    visits, questions, errors = results.close()
    assert visits == [{"visit": 0}] and questions == [{"visit": 0, "question": 0}]
    assert errors[0] == "visit 1: RuntimeError: refused" and len(errors) == 2
    assert errors[1].startswith("a visit still under way 600 s after --max-seconds, abandoned")
    assert not results.end({"visit": 2}, [])  # it ended at last: the record is already made
    assert results.visits == [{"visit": 0}] and results.errors == [errors[0]]


def test_a_server_that_fails_keeps_the_policies_measured_before_it(tmp_path, monkeypatch, capsys):
    measured = synthetic_result()

    def run_benchmark(config, progress, log_dir, on_policy_done):
        on_policy_done({"records": measured["records"][:1], "meta": {**measured["meta"], "config": asdict(config)}})
        raise ServerExited("the lava server exited with code 1")

    monkeypatch.setattr(serve, "run_benchmark", run_benchmark)
    monkeypatch.setattr("sys.argv", ["lava-sglang", "bench", "serve"])
    (tmp_path / "serving.md").write_text("the folder's last whole run\n")
    assert serve.main(["--policies", "none", "lava", "--out", str(tmp_path), "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert (f"error: the lava server exited with code 1; {tmp_path / 'serving_partial'}.md holds what was "
            "measured before: none") in error
    saved = json.loads((tmp_path / "serving_partial.json").read_text())
    assert [record["policy"] for record in saved["records"]] == ["none"]
    assert saved["meta"]["command"] == f"lava-sglang bench serve --policies none lava --out {tmp_path} --no-progress"
    assert "**A partial run**: no figures for lava" in (tmp_path / "serving_partial.md").read_text()
    assert (tmp_path / "serving.md").read_text() == "the folder's last whole run\n"  # a published run stays
    # A run that goes through replaces both.
    monkeypatch.setattr(serve, "run_benchmark", lambda config, progress, log_dir, on_policy_done: (
        on_policy_done({"records": measured["records"][:1], "meta": {**measured["meta"], "config": asdict(config)}})
        or synthetic_result()))
    assert serve.main(["--policies", "none", "lava", "--out", str(tmp_path), "--no-progress"]) == 0
    assert not list(tmp_path.glob("serving_partial.*"))
    assert "**A partial run**" not in (tmp_path / "serving.md").read_text()


def test_a_new_run_does_not_take_the_notes_of_the_run_already_in_its_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "run_benchmark", lambda config, progress, log_dir, on_policy_done: synthetic_result())
    (tmp_path / "serving_notes.md").write_text("The earlier run lost 15 points.\n")
    assert serve.main(["--policies", "none", "lava", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "15 points" not in (tmp_path / "serving.md").read_text()
    assert serve.main(["--report-only", "--out", str(tmp_path)]) == 0  # rebuilding that folder's run takes them
    assert "15 points" in (tmp_path / "serving.md").read_text()


def test_an_error_that_is_not_a_server_failing_is_not_reported_as_one(tmp_path, monkeypatch):
    def run_benchmark(config, progress, log_dir, on_policy_done):
        raise RuntimeError("a bug in the client")

    monkeypatch.setattr(serve, "run_benchmark", run_benchmark)
    with pytest.raises(RuntimeError, match="a bug in the client"):
        serve.main(["--policies", "none", "--out", str(tmp_path), "--no-progress"])


def test_the_recorded_command_drops_only_the_subcommand(tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "run_benchmark", lambda config, progress, log_dir, on_policy_done: {"records": [],
                                                                                                   "meta": {}})
    written = {}
    monkeypatch.setattr("lava_sglang.bench.serve_report.write_serving_report",
                        lambda result, out_dir, stem: written.update(result) or [])
    parser = add_arguments(__import__("argparse").ArgumentParser())
    args = parser.parse_args(["--name", "serve", "--out", str(tmp_path)])
    args.argv = ["bench", "serve", "--name", "serve", "--out", str(tmp_path)]
    assert serve.run(args) == 0
    assert written["meta"]["command"] == f"lava-sglang bench serve --name serve --out {tmp_path}"


def test_server_args_and_validation():
    config = ServeConfig(budget=0.2, server_args=["--kv-window", "64"])
    args = policy_server_args("lava", config, 4096, cuda=False)
    assert args[:2] == ["--kv-policy", "lava"] and "--kv-budget" in args and args[-2:] == ["--kv-window", "64"]
    assert args[args.index("--max-total-tokens") + 1] == "4096" and "float32" in args
    none = policy_server_args("none", config, None, cuda=True)
    assert "--kv-budget" not in none and "--max-total-tokens" not in none and "--dtype" not in none
    check_loopback("http://127.0.0.1:30000")
    check_loopback("http://localhost:8000")
    check_loopback("http://[::1]:8000")
    with pytest.raises(ValueError, match="loopback"):
        check_loopback("http://10.0.0.2:30000")
    for flag in ("--incremental-streaming-output", "--incremental-streaming"):  # SGLang takes the abbreviation
        with pytest.raises(ValueError, match="--incremental-streaming-output.*answers would be cut short"):
            ServeConfig(server_args=[flag]).validate()
    with pytest.raises(ValueError, match="policies"):
        ServeConfig(policies=["full"]).validate()
    with pytest.raises(ValueError, match="budget"):
        ServeConfig(budget=1.5).validate()
    with pytest.raises(ValueError, match="each at most once"):  # two servers, one label
        ServeConfig(policies=["none", "lava", "lava"]).validate()
    for per_visit in (-3, 5):  # above --questions, the report would give programs of 5 questions, not 4
        with pytest.raises(ValueError,
                           match=r"--questions-per-visit must be 0 \(all in one visit\) to --questions \(4\)"):
            ServeConfig(questions=4, questions_per_visit=per_visit).validate()
    with pytest.raises(ValueError, match="--seed must be >= 0"):  # Random(-1) draws Random(1)'s documents
        ServeConfig(seed=-1).validate()
    with pytest.raises(ValueError, match="--max-tokens must be >= 7: a shorter answer cannot name a 7-digit code"):
        ServeConfig(max_tokens=6).validate()
    # The default 2 questions per visit, with --questions 1: one visit of the one question; the flag
    # itself is checked.
    parser = add_arguments(__import__("argparse").ArgumentParser())
    for flags in ([], ["--memory-bound"]):
        assert config_from_args(parser.parse_args([*flags, "--questions", "1"])).questions_per_visit == 1
    with pytest.raises(ValueError, match=r"--questions \(1\), got 2$"):
        config_from_args(parser.parse_args(["--questions", "1", "--questions-per-visit", "2"])).validate()
    for flags in (["--questions-per-visit", "-3"], ["--seed", "-1"], ["--max-tokens", "6"]):
        with pytest.raises(SystemExit):  # refused at parse time, before any tokenizer or document
            add_arguments(__import__("argparse").ArgumentParser()).parse_args(flags)


# --- statistics -----------------------------------------------------------------------------------


def test_percentiles_match_numpy_linear():
    numpy = pytest.importorskip("numpy")
    values = [0.3, 1.2, 0.1, 5.0, 2.2, 0.9, 0.4]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)))
    assert percentile([], 50) is None
    assert percentile([2.0], 99) == 2.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary_skips_missing_values():
    summary = latency_summary([1.0, None, 3.0])
    assert summary == {"p50": 2.0, "p90": pytest.approx(2.8), "p99": pytest.approx(2.98), "mean": 2.0, "n": 2}
    assert latency_summary([])["p50"] is None


def _store(entries, available, slots=0, stored=0):
    return {"entries": entries, "pool_available": available, "borrowed_slots": slots, "bytes_stored": stored,
            "prefix_tokens": 0, "compressions": 0, "compress_seconds": 0.0}


def test_store_peaks():
    samples = [{"store": _store(0, 4000)}, {"store": _store(2, 3000, 40, 800), "running_tokens": 500},
               {"store": _store(1, 3500, 20, 400), "running_tokens": 200}]
    peaks = store_peaks(samples, capacity=4096, bytes_per_token=10.0)
    assert peaks["peak_pool_used_tokens"] == 1096 and peaks["peak_kv_bytes"] == 10960.0
    assert (peaks["peak_store_entries"], peaks["peak_store_slots"], peaks["peak_store_bytes"]) == (2, 40, 800)
    assert peaks["mean_store_entries"] == 1.0 and peaks["peak_running_tokens"] == 500
    assert peaks["peak_tree_tokens"] == 0
    stock = store_peaks([{"running_tokens": 7}, {}], capacity=4096, bytes_per_token=10.0)
    assert stock["peak_pool_used_tokens"] is None and stock["peak_running_tokens"] == 7
    assert stock["peak_store_entries"] is None and stock["peak_tree_tokens"] is None
    # Pool counters without a store (stock SGLang, where the plugin reports them).
    pool = store_peaks([{"store": {"pool_available": 1000, "evictable": 2500, "protected": 500}}], 4096, 10.0)
    assert pool["peak_pool_used_tokens"] == 3096 and pool["peak_tree_tokens"] == 3000
    assert pool["peak_store_entries"] is None


def test_each_server_behind_a_router_has_its_peak_entries_none_where_it_has_no_store():
    samples = [{"server_entries": [2, 1]}, {}, {"server_entries": [3, None]}]
    servers = serve.per_server(["http://a", "http://b"], [{"compressions": 4}, None], samples)
    assert servers == [{"url": "http://a", "peak_store_entries": 3, "compressions": 4},
                       {"url": "http://b", "peak_store_entries": 1, "compressions": None}]
    stock = serve.per_server(["http://a", "http://b"], [None, None], [{"server_entries": [None, None]}])
    assert [server["peak_store_entries"] for server in stock] == [None, None]  # not 0: reported as n/a


def test_stores_of_servers_behind_a_router_are_summed():
    first = {**_store(2, 1000, 40, 800), "compressions": 2, "compress_seconds": 0.5, "last_repetition": {"seconds": 1},
             "repetition_cost": {"documents": 2, "repetition_seconds": 6.0, "prefill_seconds": 4.0, "ratio": 1.5,
                                 "forward_seconds": 5.0, "forward_ratio": 1.25, "not_compared": 1}}
    second = {**_store(1, 3000, 20, 400), "compressions": 1, "compress_seconds": 0.25,
              "repetition_cost": {"documents": 1, "repetition_seconds": 4.0, "prefill_seconds": 1.0, "ratio": 4.0,
                                  "forward_seconds": 2.5, "forward_ratio": 2.5}}
    total = combined_store([first, None, second])
    assert (total["entries"], total["pool_available"], total["borrowed_slots"], total["bytes_stored"]) == (3, 4000, 60,
                                                                                                          1200)
    assert total["compressions"] == 3 and total["compress_seconds"] == 0.75 and "last_repetition" not in total
    assert total["repetition_cost"] == {"documents": 3, "repetition_seconds": 10.0, "prefill_seconds": 5.0,
                                        "ratio": 2.0, "forward_seconds": 7.5, "forward_ratio": 1.5, "not_compared": 1}
    # A server that did not time its repetitions' forwards (one that predates them): their sum is unknown.
    older = {**second, "repetition_cost": {"documents": 1, "repetition_seconds": 4.0, "prefill_seconds": 1.0,
                                           "ratio": 4.0}}
    assert combined_store([first, older])["repetition_cost"]["forward_ratio"] is None
    assert combined_store([None, first]) is first and combined_store([None]) is None


def test_a_data_parallel_servers_ranks_are_summed():
    first, second = {**_store(2, 1000, 40, 800), "compressions": 2}, {**_store(1, 3000, 20, 400), "compressions": 1}
    states = [{"lava_kv_policy": {"store": first}}, {"lava_kv_policy": {"store": second}}]
    assert serve.server_counters(states) == combined_store([first, second])
    assert serve.server_counters(states)["entries"] == 3
    pools = [{"lava_kv_policy": {"pool": {"pool_available": 5}}}, {"lava_kv_policy": {"pool": {"pool_available": 7}}}]
    assert serve.server_counters(pools) is None  # a store was asked for
    assert serve.server_counters(pools, ("store", "pool")) == {"pool_available": 12}
    assert serve.server_counters([{}]) is None  # no plugin
    assert serve.total([8192, 8192]) == 16384 and serve.total([8192, None]) is None


class _Response:
    def __init__(self, status_code: int, body: dict | Exception):
        self.status_code, self.body = status_code, body

    def json(self) -> dict:
        if isinstance(self.body, Exception):  # what a body that is not JSON raises
            raise self.body
        return self.body


@pytest.mark.parametrize("workers, expected", [
    (["http://b:2", "http://a:1"], ["http://a:1", "http://b:2"]),  # the router lists them in no fixed order
    (None, ["http://router:0"]),  # a server, not a router: no /workers
])
def test_servers_behind_a_router(monkeypatch, workers, expected):
    response = _Response(200, {"workers": [{"url": url} for url in workers]}) if workers else _Response(404, {})
    monkeypatch.setattr(serve.requests, "get", lambda url, timeout: response)
    assert serve.server_urls("http://router:0") == expected


def _calls(document: Document, visit: Visit, cached_commit: int, cached_question: int) -> list[dict]:
    prefix, suffixes = program_inputs(document, visit)
    calls = [{"kind": "commit", "seconds": 1.5, "meta_info": {"prompt_tokens": 1000, "cached_tokens": cached_commit}}]
    for k, suffix in enumerate(reversed(suffixes)):  # branches finish in any order
        calls.append({"kind": "gen", "text": prefix + suffix, "ttft": 0.1 * (k + 1), "e2e": 1.0 + k,
                      "meta_info": {"prompt_tokens": 1020, "cached_tokens": cached_question,
                                    "completion_tokens": 9, "e2e_latency": 0.9}})
    return calls


def synthetic_run(policy: str, hit_on_revisit: bool, correct: bool, wall: float, entries: int | None):
    """Two documents visited twice each (interleaved), two questions per visit."""
    documents = [_document(), _document()]
    for doc in documents:
        doc.questions = doc.questions * 2
    visits = build_workload([4, 4], 2, "interleaved")
    visit_rows, question_rows = [], []
    for visit in visits:
        cached = 999 if (visit.round > 0 and hit_on_revisit) else 0
        document = documents[visit.document]
        answers = [(" 1234567" if correct else " 42") if document.questions[q].answer == "1234567"
                   else " 7654321" for q in visit.questions]
        row, questions = visit_records(visit, documents[visit.document], 1000,
                                       _calls(documents[visit.document], visit, cached, 999), answers, 2.0)
        visit_rows.append(row)
        question_rows.extend(questions)
    samples = [] if entries is None else [{"store": _store(entries, 3000, 60, 6000)}]
    final = None if entries is None else {**_store(entries, 3000, 60, 6000), "compressions": 2,
                                          "compress_seconds": 0.5,
                                          "pending": 0, "repetitions": 0,
                                          "repetition_cost": {"documents": 2, "repetition_seconds": 6.0,
                                                              "prefill_seconds": 4.0, "ratio": 1.5,
                                                              "forward_seconds": 5.0, "forward_ratio": 1.25}}
    return summarize(policy, visit_rows, question_rows, samples, final, wall, 4096, 100.0, 2, truncated=False)


def test_visit_records_match_branches_to_questions():
    document = _document()
    visit = Visit(3, 0, (0, 1), 1)
    row, questions = visit_records(visit, document, 1000, _calls(document, visit, 0, 999), [" 1234567", " 1"], 2.5)
    assert row == {"visit": 3, "document": 0, "round": 1, "questions": 2, "prefix_tokens": 1000, "seconds": 2.5,
                   "commit_seconds": 1.5, "commit_prompt_tokens": 1000, "commit_cached_tokens": 0}
    assert [q["correct"] for q in questions] == [True, False]
    # Question 0's call is the last one recorded (reversed), with ttft 0.2.
    assert [q["ttft"] for q in questions] == [0.2, 0.1]
    assert all(q["cached_tokens"] == 999 and q["server_e2e"] == 0.9 for q in questions)
    # The same question twice in one visit: each gets its own call.
    document.questions = [document.questions[0]] * 2
    _, twice = visit_records(visit, document, 1000, _calls(document, visit, 0, 999), ["a", "b"], 1.0)
    assert sorted(q["ttft"] for q in twice) == [0.1, 0.2]


def test_summary_counts_recomputations_hits_and_throughput():
    stock = synthetic_run("none", hit_on_revisit=False, correct=True, wall=40.0, entries=None)
    lava = synthetic_run("lava", hit_on_revisit=True, correct=False, wall=10.0, entries=2)
    assert (stock["visits"], stock["questions"]) == (4, 8)
    assert stock["document_prefills"] == 4 and stock["recomputations"] == 2 and stock["revisit_hit_rate"] == 0.0
    assert lava["document_prefills"] == 2 and lava["recomputations"] == 0 and lava["revisit_hit_rate"] == 1.0
    assert stock["accuracy"] == 1.0 and lava["accuracy"] == 0.5
    assert stock["question_throughput"] == 8 / 40 and lava["question_throughput"] == 8 / 10
    # cached share: 4 commits of 1000 tokens (2 hit 999) + 8 questions of 1020 (999 each)
    assert lava["cached_token_share"] == pytest.approx((2 * 999 + 8 * 999) / (4 * 1000 + 8 * 1020))
    assert lava["compress_seconds_per_document"] == 0.25 and stock["compress_seconds_per_document"] is None
    assert lava["repetition_seconds_per_document"] == 3.0 and lava["repetition_cost_ratio"] == 1.5
    assert lava["repetition_forward_seconds_per_document"] == 2.5 and lava["repetition_forward_ratio"] == 1.25
    assert stock["repetition_seconds_per_document"] is None and stock["repetition_cost_ratio"] is None
    assert stock["repetition_forward_seconds_per_document"] is None and stock["repetition_forward_ratio"] is None
    assert lava["documents_resident"] == 2 and lava["documents_resident_source"].startswith("peak")
    assert stock["documents_resident"] == 2 and stock["documents_resident_source"].startswith("upper")
    assert lava["peak_kv_bytes"] == (4096 - 3000) * 100.0 and stock["peak_kv_bytes"] is None
    assert lava["ttft"]["n"] == 8 and lava["e2e"]["p50"] is not None
    # Two ranks (or servers behind a router) holding a copy of both documents each: 2 documents, not 4.
    copies = synthetic_run("lava", hit_on_revisit=True, correct=False, wall=10.0, entries=4)
    assert copies["peak_store_entries"] == 4 and copies["documents_resident"] == 2


# --- report ---------------------------------------------------------------------------------------


def synthetic_result() -> dict:
    records = [synthetic_run("none", False, True, 40.0, None), synthetic_run("lava", True, True, 10.0, 2)]
    meta = {
        "model": "SmolLM2", "device": "CPU (SGLang CPU engine)", "machine": "x86_64, 2 CPUs",
        "versions": {"sglang": "0.5.23", "torch": "2.x"}, "wall_seconds": 120.0, "command": "lava-sglang bench serve",
        "servers": {"none": {"args": ["--kv-policy", "none"]}, "lava": {"args": ["--kv-policy", "lava"]}},
        "workload": {"documents": 2, "questions_per_document": 4, "questions_per_visit": 2, "visits": 4,
                     "order": "interleaved", "clients": 2, "max_tokens": 16, "context_tokens": 1024,
                     "document_tokens": [1000, 1000], "seed": 0, "budget": 0.2, "max_total_tokens": 4096,
                     "memory_bound": True, "resident_documents": 3, "max_seconds": 600, "miss_slack_tokens": 64},
    }
    return {"records": records, "meta": meta}


def test_a_report_says_when_a_documents_questions_repeat_its_facts():
    result = synthetic_result()
    assert "which repeat them" not in markdown(result, "serving")
    result["meta"]["workload"]["distinct_questions_per_document"] = 3
    assert "Each document plants 3 facts for its 4 questions, which repeat them" in markdown(result, "serving")


def test_a_report_gives_the_pool_cap_the_run_set_or_the_one_the_server_reported():
    result = synthetic_result()
    assert "KV pool cap: 4096 tokens;" in markdown(result, "serving")
    result["meta"]["workload"]["max_total_tokens"] = None  # a --url run: the server's own pool
    assert "KV pool cap: the server's own (4096 tokens);" in markdown(result, "serving")
    for record in result["records"]:
        record["capacity_tokens"] = None
    assert "KV pool cap: the server's own;" in markdown(result, "serving")


def test_comparison_against_the_targets():
    result = synthetic_result()
    compared = comparison(result["records"])
    assert compared["question_throughput_ratio"] == pytest.approx(4.0)
    assert compared["documents_resident_ratio"] == 1.0 and compared["accuracy_points"] == 0.0
    assert compared["revisit_hit_rate"] == 1.0
    assert compared["met"] == {"documents_resident": False, "revisit_hit_rate": True, "question_throughput": True,
                               "accuracy": True}
    assert comparison(result["records"][:1]) is None
    # 12/80 against 16/80 is 5 points down, on the target's edge (float noise must not fail it).
    edge = comparison([{"policy": "none", "accuracy": 16 / 80}, {"policy": "lava", "accuracy": 12 / 80}])
    assert edge["accuracy_points"] == -5.0 and edge["met"]["accuracy"] and edge["incomplete"] == []


def test_targets_are_not_judged_on_servers_whose_pools_differ():
    # SGLang lowers --max-total-tokens to the memory it found, with a warning only.
    result = synthetic_result()
    assert comparison(result["records"])["incomplete"] == []
    result["records"][1]["capacity_tokens"] = 3000
    assert comparison(result["records"])["incomplete"] == ["the pools differ (none 4096 tokens, lava 3000)"]


def test_a_stream_the_server_aborts_fails_its_program_instead_of_counting_a_wrong_answer(monkeypatch):
    # SGLang ends an aborted stream with an ordinary chunk whose finish_reason is "abort".
    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

    from lava_sglang.bench.serve_workload import timed_endpoint

    monkeypatch.setattr(RuntimeEndpoint, "__init__", lambda self, url: None)
    endpoint = timed_endpoint("http://127.0.0.1:1").for_visit()
    state = SimpleNamespace(text_="question")
    finishes = iter([{"type": "length", "length": 24},
                     {"type": "abort", "status_code": 503, "message": "the scheduler is overloaded"}])
    monkeypatch.setattr(type(endpoint), "generate_stream",
                        lambda self, s, sampling_params: iter([(" 1234", {}), ("", {"finish_reason": next(finishes)})]))
    assert endpoint.generate(state, {})[0] == " 1234"
    with pytest.raises(RuntimeError, match=r"the server aborted the request \(503: the scheduler is overloaded\)"):
        endpoint.generate(state, {})
    assert len(endpoint.calls) == 1  # the aborted one is not recorded as an answer


def test_the_final_figures_wait_for_the_last_compressions(monkeypatch):
    # A document whose repetition is still running when the workload ends would be missing from
    # the compressions and the repetition cost; the wait gives up after the timeout.
    reads = iter([{"pending": 2, "repetitions": 1, "compressions": 2}, {"pending": 1, "repetitions": 1,
                                                                        "compressions": 3},
                  {"pending": 0, "repetitions": 0, "compressions": 4}])
    monkeypatch.setattr(serve, "server_facts", lambda url: {"store": next(reads)})
    assert serve.settled_stores(["http://a"], timeout=5.0, pause=0.0) == [{"pending": 0, "repetitions": 0,
                                                                            "compressions": 4}]
    monkeypatch.setattr(serve, "server_facts", lambda url: {"store": {"pending": 1, "repetitions": 0}})
    assert serve.settled_stores(["http://a", "http://b"], timeout=0.0, pause=0.0) == [{"pending": 1,
                                                                                       "repetitions": 0}] * 2
    monkeypatch.setattr(serve, "server_facts", lambda url: {"store": None})  # stock SGLang: nothing to wait for
    assert serve.settled_stores(["http://a"], timeout=5.0, pause=0.0) == [None]


def test_a_compression_that_finished_after_the_last_sample_counts_in_the_documents_resident():
    # The last sample saw 1 compressed document; the final read, once the last compression was
    # done, 2: both are held.
    final = {**_store(2, 3000, 60, 6000), "compressions": 2, "compress_seconds": 0.5}
    record = summarize("lava", [], [], [{"store": _store(1, 3000, 60, 6000)}], final, 10.0, 4096, 100.0, 2,
                       truncated=False)
    assert record["peak_store_entries"] == 2 and record["documents_resident"] == 2


def test_a_record_says_which_repetitions_were_not_compared_and_which_compressions_were_unfinished():
    result = synthetic_result()
    lava = result["records"][1]
    assert lava["repetition_not_compared"] is None and lava["compressions_unfinished"] == 0
    text = markdown(result, "serving")
    assert "not compared |" not in text and "Compressions not finished" not in text
    lava["repetition_not_compared"], lava["compressions_unfinished"] = 2, 1
    text = markdown(result, "serving")
    assert "3.00 (1.50x, 2 not compared)" in text
    assert "Compressions not finished when the figures were read (a minute after the workload): lava: 1." in text


def test_targets_are_not_judged_on_a_run_cut_short_or_with_failed_programs(tmp_path):
    result = synthetic_result()
    result["records"][0]["truncated"] = True
    result["records"][1]["errors"] = ["HTTP 500", "timeout"]
    compared = comparison(result["records"])
    assert compared["incomplete"] == ["none was cut short by --max-seconds", "lava had 2 failed program(s)"]
    result["meta"]["workload"]["memory_bound"] = True
    text = markdown(dict(result, comparison=compared), "serve")
    assert "met" not in text.split("## lava against none")[1].replace("not judged", "")
    assert "The targets are not judged: none was cut short by --max-seconds; lava had 2 failed program(s)" in text


def test_by_visit_splits_first_visits_from_revisits():
    record = {
        "question_records": [{"round": 0, "correct": True}, {"round": 0, "correct": False},
                             {"round": 1, "correct": False}, {"round": 2, "correct": True},
                             {"round": 1, "correct": None}],  # a question without a planted code
        "visit_records": [{"round": 0, "seconds": 6.0}, {"round": 1, "seconds": 2.0}, {"round": 2, "seconds": 3.0}],
    }
    assert by_visit(record) == {"first": {"correct": 1, "questions": 2, "mean_seconds": 6.0},
                                "revisit": {"correct": 1, "questions": 2, "mean_seconds": 2.5}}


def test_report_writer(tmp_path):
    result = synthetic_result()
    paths = write_serving_report(result, tmp_path, "serving")
    assert [p.name for p in paths] == ["serving.json", "serving.md", "serving.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    saved = json.loads(paths[0].read_text())
    assert [r["policy"] for r in saved["records"]] == ["none", "lava"]
    assert saved["meta"]["workload"]["documents"] == 2 and "comparison" in saved
    text = paths[1].read_text()
    assert "| none |" in text and "| lava |" in text and "memory-bound" in text
    assert "Question throughput: 4.00x (target >= 1.5x: met)" in text and "<= 2" in text
    assert "Revisit hit rate: 1.00 (target >= 0.9: met)" in text
    assert "| 3.00 (1.50x) |" in text  # lava's repetition per document and its ratio to the prefill
    result["meta"]["workload"]["memory_bound"] = False  # a standard run: no targets to compare against
    paths = write_serving_report(result, tmp_path, "serving")
    assert "comparison" not in json.loads(paths[0].read_text()) and "targets" not in paths[1].read_text()
    assert paths[2].read_bytes()[:4] == b"\x89PNG"
    # --report-only rebuilds the same markdown from the JSON.
    assert markdown(saved, "serving") == text


def test_documents_resident_from_pool_counters_when_no_store():
    record = synthetic_run("none", hit_on_revisit=False, correct=True, wall=40.0, entries=None)
    assert record["documents_resident_source"].startswith("upper")
    document = _document()
    visit = Visit(0, 0, (0,), 0)
    row, questions = visit_records(visit, document, 1000, _calls(document, visit, 0, 999), [" 1234567"], 1.0)
    samples = [{"store": {"pool_available": 1000, "evictable": 2100, "protected": 900}}]
    pooled = summarize("none", [row], questions, samples, None, 5.0, 4096, 10.0, 4, truncated=False)
    assert pooled["documents_resident"] == 3 and pooled["documents_resident_source"].startswith("peak radix")
    assert pooled["peak_pool_used_tokens"] == 3096 and pooled["compressions"] is None


def test_report_only_rebuilds_from_the_json_with_notes(tmp_path):
    from lava_sglang.bench.serve import main

    write_serving_report(synthetic_result(), tmp_path, "serving_memory_bound")
    (tmp_path / "serving_memory_bound.md").unlink()
    (tmp_path / "serving_memory_bound_notes.md").write_text("Measured on a busy machine.\n")
    assert main(["--memory-bound", "--report-only", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "serving_memory_bound.md").read_text()
    assert "## Reading the results" in text and "Measured on a busy machine." in text
    assert main(["--url", "http://10.1.2.3:30000", "--out", str(tmp_path)]) == 2  # loopback only


def test_report_only_refuses_the_flags_of_a_run(tmp_path, capsys):
    from lava_sglang.bench.serve import main

    write_serving_report(synthetic_result(), tmp_path, "serving")
    assert main(["--report-only", "--out", str(tmp_path), "--budget", "0.1", "--seed", "1"]) == 2
    error = capsys.readouterr().err
    assert "--budget, --seed would change a run, not its report: leave them out" in error
    assert main(["--report-only", "--out", str(tmp_path), "--seed", "0", "--no-progress"]) == 0  # defaults pass


def test_report_only_without_its_json_and_notes_that_are_not_there_are_refused(tmp_path, capsys):
    from lava_sglang.bench.serve import main

    assert main(["--report-only", "--out", str(tmp_path)]) == 2
    assert f"--report-only: no {tmp_path / 'serving.json'} to rebuild the report from" in capsys.readouterr().err
    # Another command's file under the name given (a quality run's list, a serve-reference run's object).
    for other in ([{"policy": "lava"}], {"results": "serving.json", "summaries": [], "answers": {}}):
        (tmp_path / "quality.json").write_text(json.dumps(other))
        assert main(["--report-only", "--out", str(tmp_path), "--name", "quality"]) == 2
        assert f"{tmp_path / 'quality.json'} is not what `bench serve` writes" in capsys.readouterr().err
    write_serving_report(synthetic_result(), tmp_path, "serving")
    assert main(["--report-only", "--out", str(tmp_path), "--notes", str(tmp_path / "notse.md")]) == 2
    assert f"--notes: no file {tmp_path / 'notse.md'}" in capsys.readouterr().err
    (tmp_path / "serving_notes.md").write_text("Default notes.\n")
    assert main(["--report-only", "--out", str(tmp_path)]) == 0
    assert "Default notes." in (tmp_path / "serving.md").read_text()
    # The notes are in the JSON now; none takes them out of both.
    assert main(["--report-only", "--out", str(tmp_path), "--notes", "none"]) == 0
    assert "Reading the results" not in (tmp_path / "serving.md").read_text()
    assert "notes" not in json.loads((tmp_path / "serving.json").read_text())


def test_samples_and_facts_read_every_server_and_a_missing_server_is_not_free_memory(monkeypatch):
    import requests

    def state(entries, available):
        return {"lava_kv_policy": {"window": 8, "store": _store(entries, available, 10 * entries, 100 * entries)},
                "memory_usage": {"token_capacity": 4096, "kvcache": 0.5}}

    answers = {"http://a/server_info": {"internal_states": [state(2, 1000)]},
               "http://b/server_info": {"internal_states": [state(1, 3000), state(1, 500)]},  # two --dp-size ranks
               "http://a/v1/loads": {"loads": [{"num_used_tokens": 30}]}, "http://b/v1/loads": [{"num_used_tokens": 5}]}
    monkeypatch.setattr(requests, "get", lambda url, timeout: _Response(200, answers[url]))
    sample = serve.Sampler(["http://a", "http://b"], interval=1.0).sample()
    assert sample["store"]["entries"] == 4 and sample["store"]["pool_available"] == 4500
    assert sample["server_entries"] == [2, 2] and sample["running_tokens"] == 35
    facts = serve.server_facts("http://b")
    assert facts["capacity_tokens"] == 8192 and facts["bytes_per_token"] == 0.5 * 2**30 / 4096
    assert facts["kv_policy"] == {"window": 8} and facts["store"]["entries"] == 2
    assert facts["unreadable_answers"] == []
    answers["http://b/server_info"]["incremental_streaming_output"] = True  # SGLang's server args, flattened
    assert serve.server_facts("http://b")["unreadable_answers"] == ["--incremental-streaming-output"]
    # A server that does not answer: no store sample at all (its pool would read as free).
    answers["http://b/server_info"] = ValueError("not JSON")
    sample = serve.Sampler(["http://a", "http://b"], interval=1.0).sample()
    assert "store" not in sample and sample["running_tokens"] == 35


def test_the_timed_endpoint_records_the_first_token_and_the_whole_generation(monkeypatch):
    import time
    from types import SimpleNamespace

    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

    from lava_sglang.bench.serve_workload import timed_endpoint

    monkeypatch.setattr(RuntimeEndpoint, "__init__", lambda self, url: setattr(self, "base_url", url))

    def generate_stream(self, s, sampling_params):
        time.sleep(0.05)
        yield "The code", {}
        time.sleep(0.1)
        yield " is 1234567", {"cached_tokens": 90}

    monkeypatch.setattr(RuntimeEndpoint, "generate_stream", generate_stream, raising=False)
    endpoint = timed_endpoint("http://a").for_visit()
    text, meta_info = endpoint.generate(SimpleNamespace(text_="question"), {})
    assert text == "The code is 1234567" and meta_info == {"cached_tokens": 90}
    (call,) = endpoint.calls
    assert call["kind"] == "gen" and call["text"] == "question" and call["meta_info"] == {"cached_tokens": 90}
    assert call["ttft"] >= 0.05 and call["e2e"] - call["ttft"] >= 0.1  # the second piece came 0.1 s after the first
    assert timed_endpoint("http://a").for_visit().calls == []  # each visit its own records


def test_a_report_names_the_code_it_ran(tmp_path, monkeypatch):
    # This checkout's commit, "-dirty" with changes; the package version outside a checkout of
    # its own (no git, or an installed copy inside another repository).
    import subprocess

    from lava_sglang import __version__
    from lava_sglang.bench import code_revision

    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent, check=True).stdout.strip()
    assert len(head) == 12 and code_revision().startswith(head)
    real_run = subprocess.run

    def inside_another_repository(command, **kwargs):
        if "--show-toplevel" in command:
            return subprocess.CompletedProcess(command, 0, stdout=str(tmp_path) + "\n")
        return real_run(command, **kwargs)

    monkeypatch.setattr(subprocess, "run", inside_another_repository)
    assert code_revision() == __version__
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: (_ for _ in ()).throw(FileNotFoundError("git")))
    assert code_revision() == __version__
    result = synthetic_result()
    result["meta"]["versions"] = {"lava-sglang": "abc123def456", **result["meta"]["versions"]}
    assert "- Versions: lava-sglang abc123def456, sglang 0.5.23" in markdown(result, "serving")


def test_the_accuracy_gap_has_a_paired_interval_over_documents():
    from lava_sglang.bench.stats import gap_interval

    assert gap_interval([(3, 3, 8)] * 10) == (0.0, 0.0)  # the same answers: no spread
    assert gap_interval([(3, 4, 8)] * 10) == (-12.5, -12.5)  # one fewer per document, every time
    low, high = gap_interval([(8, 0, 8)] + [(0, 0, 8)] * 9)  # one document decides it: wide, and above 0
    assert low == 0.0 and high >= 30.0
    assert gap_interval([(3, 4, 8)]) is None and gap_interval([]) is None

    def questions(right_per_document: list[int]) -> list[dict]:
        return [{"document": document, "visit": document, "round": 0, "question": index, "correct": index < right}
                for document, right in enumerate(right_per_document) for index in range(8)]

    result = synthetic_result()
    stock, lava = result["records"]
    stock.update(accuracy=16 / 80, question_records=questions([2] * 8 + [0, 0]))
    lava.update(accuracy=12 / 80, question_records=questions([2] * 6 + [0] * 4))
    compared = comparison([stock, lava])
    assert compared["accuracy_points"] == -5.0 and compared["met"]["accuracy"]
    low, high = compared["accuracy_points_ci95"]
    assert low < -5.0 < high <= 0.0  # -5 on the edge; the interval says how far it could move
    text = markdown(dict(result, comparison=compared), "serving")
    assert f"- Accuracy: -5.0 points [{low:+.1f}, {high:+.1f}] (95%, documents resampled)" in text
