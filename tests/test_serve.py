"""Braid over HTTP on a local Ray cluster with the embedded model: the OpenAI client and raw
HTTP, streaming and not, latency budgets, and bad requests answered with a clear 4xx."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import ray
import requests
from openai import OpenAI
from ray import serve

from cache_service.transfer import free_port
from cluster.auth import Access
from cluster.config import ClusterConfig
from cluster.serve import PATIENT_SERVE, BraidAPI, EventStream
from countdown.traces import SERVE_OPTIONS

MODEL = Path(__file__).resolve().parents[1] / "countdown" / "model"
PROMPT = "44 12 8 3>43\n"
WHOLE_SEARCH = 4000  # tokens: room for the embedded model's whole search (4-8 children, ~10 grandchildren each)
NAME = "countdown-braid"  # the served model name (`served_model_name`)
KEYS = ("key-one-" + "a" * 24, "key-two-" + "b" * 24)
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}


def free_ports(count: int) -> int:
    """The first of `count` consecutive TCP ports free now, below the kernel's ephemeral range:
    there no outgoing connection (Ray opens many) takes one before its server binds it."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    end = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32768
    for base in range(20000, end - count, count):  # above Ray's worker ports (10002-19999)
        try:
            for port in range(base, base + count):
                socket.create_server(("", port)).close()
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports below {end}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """(base URL, metrics port) of a running Braid app: two API keys, one request in flight per key
    (every test's requests in a row pass only if each key is released when its request ends)."""
    port, metrics_port = free_port(), free_ports(2)  # the ingress's metrics port, the replica's next
    keys_file = tmp_path_factory.mktemp("keys") / "api_keys"
    keys_file.write_text("# Braid test keys\n" + "\n".join(KEYS) + "\n")
    os.environ.update(PATIENT_SERVE)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ClusterConfig(
            model_path=str(MODEL), served_model_name=NAME, kv_cache_bytes=32 * 2**20, metrics_port=metrics_port
        )
        access = Access(keys_file=str(keys_file), max_in_flight_per_key=1)
        serve.run(BraidAPI.bind(config, SERVE_OPTIONS, access), name="braid")
        yield f"http://127.0.0.1:{port}", metrics_port
    finally:
        serve.shutdown()
        ray.shutdown()


def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server[0]}/v1", api_key=KEYS[0], max_retries=0)


def test_models_health_and_readiness(server) -> None:
    base = server[0]
    assert requests.get(f"{base}/healthz", timeout=30).json() == {"status": "ok"}
    assert requests.get(f"{base}/health", timeout=30).status_code == 200  # vLLM's path
    assert requests.get(f"{base}/readyz", timeout=30).json()["status"] == "ready"
    assert [m.id for m in client(server).models.list().data] == [NAME]
    lost = requests.get(f"{base}/v1/nowhere", headers=AUTH, timeout=30)
    assert lost.status_code == 404 and lost.json()["error"]["code"] == 404  # OpenAI's shape, not FastAPI's


def test_completion_through_the_openai_client_carries_the_thread_tree(server) -> None:
    done = client(server).completions.create(model=NAME, prompt=PROMPT, max_tokens=WHOLE_SEARCH)
    assert done.choices[0].text and done.choices[0].finish_reason in ("stop", "length")
    braid = done.model_extra["braid"]
    assert len(braid["threads"]) > 1 and braid["threads"][0]["parent_id"] is None  # it forked
    assert done.usage.completion_tokens == sum(t["generated_tokens"] for t in braid["threads"])
    assert braid["sla"] == {
        "max_latency_s": None,
        "met": None,
        "outcome": None,
        "predicted_latency_s": None,
        "deadline_shaped": False,
    }
    assert braid["fanout_cap"] is None and braid["accepted"] is True  # 44+8=52,52-12=40,40+3=43
    assert "timeline_svg" not in braid  # only on request:
    drawn = client(server).completions.create(model=NAME, prompt=PROMPT, extra_body={"timeline": True})
    svg = drawn.model_extra["braid"]["timeline_svg"]
    assert svg.startswith("<svg") and svg.count('class="thread') == len(drawn.model_extra["braid"]["threads"])


def test_a_default_stream_is_plain_openai_and_thread_events_and_usage_come_when_asked(server) -> None:
    plain = list(client(server).completions.create(model=NAME, prompt=PROMPT, max_tokens=WHOLE_SEARCH, stream=True))
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)  # chunk.choices[0] always works
    assert plain[-1].choices[0].finish_reason in ("stop", "length")
    whole = client(server).completions.create(model=NAME, prompt=PROMPT, max_tokens=WHOLE_SEARCH)
    assert "".join(c.choices[0].text for c in plain) == whole.choices[0].text  # greedy: the same answer

    asked = {"thread_events": True}
    usage = {"include_usage": True}
    chunks = list(client(server).completions.create(
        model=NAME, prompt=PROMPT, max_tokens=WHOLE_SEARCH, stream=True, stream_options=usage, extra_body=asked
    ))  # fmt: skip
    events = [c.model_extra["braid"] for c in chunks if c.choices and "event" in (c.model_extra.get("braid") or {})]
    assert any(e["event"] == "forked" for e in events) and any(e["event"] != "forked" for e in events)
    assert [c for c in chunks if not c.choices] == [chunks[-1]]  # empty choices: the usage chunk alone
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_over_raw_http_and_streamed(server) -> None:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": WHOLE_SEARCH}
    answer = requests.post(f"{server[0]}/v1/chat/completions", json=body, headers=AUTH, timeout=120).json()
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["role"] == "assistant"
    streamed = {**body, "stream": True}
    url = f"{server[0]}/v1/chat/completions"
    with requests.post(url, json=streamed, headers=AUTH, stream=True, timeout=120) as reply:
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]"
    chunks = [json.loads(line[len(b"data: ") :]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == answer["choices"][0]["message"]["content"]
    nulls = {"temperature": None, "n": None, "stream": None, "logprobs": None, "presence_penalty": None, "stop": None}
    sent = requests.post(url, json={**body, "max_tokens": 20, **nulls}, headers=AUTH, timeout=120)
    assert sent.status_code == 200, sent.text  # null is unset, as clients that send every field mean it


def test_prompt_lists_and_n_give_a_choice_each_streamed_or_not(server) -> None:
    prompts = [PROMPT, "12 5 3 7>29\n"]
    sampled = {"temperature": 0.8, "seed": 7, "max_tokens": WHOLE_SEARCH}
    done = client(server).completions.create(model=NAME, prompt=prompts, n=2, **sampled)
    assert [c.index for c in done.choices] == [0, 1, 2, 3]  # choice i answers prompt i // n
    braid = done.model_extra["braid"]["choices"]
    assert done.usage.completion_tokens == sum(sum(t["generated_tokens"] for t in b["threads"]) for b in braid)
    alone = [client(server).completions.create(model=NAME, prompt=p, max_tokens=1).usage.prompt_tokens for p in prompts]
    assert done.usage.prompt_tokens == sum(alone)  # each prompt once, not once per choice
    assert done.choices[0].text != done.choices[1].text  # each choice its own seed
    # Streamed or not, the same seeds give the same samples. One thread each (max_depth 0): a
    # search's text also depends on which of its children succeeded first, and so on the load.
    one_thread = {**sampled, "max_tokens": 200, "extra_body": {"max_depth": 0}}
    whole = client(server).completions.create(model=NAME, prompt=PROMPT, n=2, **one_thread)
    assert whole.choices[0].text != whole.choices[1].text
    chunks = list(client(server).completions.create(model=NAME, prompt=PROMPT, n=2, stream=True, **one_thread))
    finished = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]
    texts = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in (0, 1)]
    assert texts == [whole.choices[0].text, whole.choices[1].text]


def test_what_the_sdks_send_for_chat_is_taken_logprobs_included(server) -> None:
    done = client(server).chat.completions.create(
        model=NAME, messages=[{"role": "system", "content": ""}, {"role": "user", "content": PROMPT}],
        max_completion_tokens=WHOLE_SEARCH, user="someone", presence_penalty=0, frequency_penalty=0, seed=3,
        logprobs=True, top_logprobs=2, n=2, temperature=0.5,
    )  # fmt: skip
    assert len(done.choices) == 2
    for choice in done.choices:
        content = choice.logprobs.content
        assert content and all(len(entry.top_logprobs) in (0, 2) for entry in content)
        sampled = [entry for entry in content if entry.logprob is not None]
        assert sampled and all(entry.logprob <= 0 and len(entry.top_logprobs) == 2 for entry in sampled)
        assert len(sampled) < len(content)  # it forked: the joins' text was inserted, not sampled
    capped = client(server).chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPT}],
                                                    max_completion_tokens=40)  # fmt: skip
    assert capped.usage.completion_tokens <= 40 and capped.choices[0].finish_reason == "length"


def test_completion_logprobs_streamed_or_not(server) -> None:
    done = client(server).completions.create(model=NAME, prompt=PROMPT, max_tokens=WHOLE_SEARCH, logprobs=3)
    logprobs = done.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) > 0
    sampled = [i for i, lp in enumerate(logprobs.token_logprobs) if lp is not None]
    for i in sampled:  # greedy: the token taken is the likeliest
        top = logprobs.top_logprobs[i]
        assert len(top) <= 3 and logprobs.token_logprobs[i] == pytest.approx(max(top.values()))
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    chunks = list(client(server).completions.create(model=NAME, prompt=PROMPT, max_tokens=WHOLE_SEARCH, logprobs=3,
                                                    stream=True))  # fmt: skip
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == logprobs.tokens


def replica_tokens(server) -> float:
    """Tokens the replica has generated so far (its Prometheus counter)."""
    text = requests.get(f"http://127.0.0.1:{server[1] + 1}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("braid_generated_tokens_total"))


def sla_counts(server) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{server[1]}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("braid_sla_total{"):  # a row per outcome and shaped (true, false)
            result = line.split('result="')[1].split('"')[0]
            counts[result] = counts.get(result, 0.0) + float(line.split()[-1])
    return counts


def test_a_budget_that_fits_is_met_and_one_predicted_not_to_is_refused_before_any_work(server) -> None:
    alone = client(server).completions.create(model=NAME, prompt=PROMPT, max_tokens=WHOLE_SEARCH)
    took = alone.model_extra["braid"]["latency_s"]
    done = client(server).completions.create(
        model=NAME, prompt=PROMPT, max_tokens=WHOLE_SEARCH, extra_body={"max_latency_s": 10 * took + 5}
    )
    braid = done.model_extra["braid"]
    assert braid["finish_reason"] == "stop" and braid["sla"]["met"] is True and braid["sla"]["outcome"] == "met"
    assert braid["sla"]["predicted_latency_s"] > 0 and braid["fanout_cap"] in (None, 2)
    assert braid["sla"]["deadline_shaped"] is False  # ten times the time it took alone: nothing refused or cut
    text = requests.get(f"http://127.0.0.1:{server[1]}/metrics", timeout=10).text
    assert any(line.startswith("braid_sla_total{") and 'result="met"' in line and 'shaped="false"' in line
               for line in text.splitlines())  # fmt: skip
    before = replica_tokens(server)
    start = time.monotonic()
    hopeless = {"prompt": PROMPT, "max_tokens": WHOLE_SEARCH, "max_latency_s": took / 10}
    for stream in (False, True):  # streamed too: refused before the response starts, not inside a 200
        refused = requests.post(f"{server[0]}/v1/completions", json={**hopeless, "stream": stream}, headers=AUTH,
                                timeout=30)  # fmt: skip
        assert refused.status_code == 503 and "cannot be met" in refused.json()["error"]["message"]
        assert int(refused.headers["Retry-After"]) >= 1
    assert time.monotonic() - start < 4.0  # refused at once, not queued
    assert replica_tokens(server) == before  # no engine work was done for them


def test_a_request_cut_short_is_a_miss_in_the_answer_and_the_metrics(server) -> None:
    before = sla_counts(server).get("truncated", 0.0)
    cut = client(server).completions.create(
        model=NAME, prompt=PROMPT, max_tokens=30, extra_body={"max_latency_s": 60.0}
    )  # it ends within its budget, but at its token limit: no answer
    braid = cut.model_extra["braid"]
    assert braid["finish_reason"] == "length" and braid["latency_s"] < 60.0
    assert braid["sla"]["met"] is False and braid["sla"]["outcome"] == "truncated"
    assert sla_counts(server)["truncated"] == before + 1


def test_api_keys_are_required_checked_and_limited_per_key(server) -> None:
    url, body = f"{server[0]}/v1/completions", {"prompt": PROMPT, "max_tokens": WHOLE_SEARCH}
    wrong = "wrong-key-" + "z" * 22
    for headers, message in (({}, "missing API key"), ({"Authorization": f"Bearer {wrong}"}, "invalid API key")):
        reply = requests.post(url, json=body, headers=headers, timeout=30)
        assert reply.status_code == 401 and reply.json()["error"]["message"].startswith(message)
        assert wrong not in reply.text
    assert requests.get(f"{server[0]}/v1/models", timeout=30).status_code == 401
    second = {"Authorization": f"Bearer {KEYS[1]}"}
    assert requests.post(url, json=body, headers=second, timeout=120).status_code == 200  # any listed key
    # One request in flight per key: while a stream holds the first key, the key is busy (429);
    # the other key is not, and the first is free again once the stream ends.
    with requests.post(url, json={**body, "stream": True}, headers=AUTH, stream=True, timeout=120) as held:
        lines = held.iter_lines()
        next(line for line in lines if line)  # the stream is under way
        busy = requests.post(url, json=body, headers=AUTH, timeout=30)
        assert busy.status_code == 429 and "in flight" in busy.json()["error"]["message"]
        assert requests.post(url, json=body, headers=second, timeout=120).status_code == 200
        assert [line for line in lines if line][-1] == b"data: [DONE]"
    assert requests.post(url, json=body, headers=AUTH, timeout=120).status_code == 200
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # Serve's access and replica logs
    assert not any(wrong in f.read_text(errors="ignore") for f in logs.rglob("*") if f.is_file())


def threads(replica) -> int:
    """Threads running or waiting on a replica."""
    load = ray.get(replica.load_dict.remote())
    return load["running"] + load["waiting"]


def alive_joins() -> int:
    """Join actors alive on the cluster (the ingress keeps one started ahead, for the next request)."""
    from ray._private import state

    return sum(a["ActorClassName"] == "Join" and a["State"] != "DEAD" for a in state.actors().values())


def test_a_vote_over_samples_is_one_choice_streamed_or_not_and_no_join_actor_is_left(server) -> None:
    sampled = {"temperature": 0.8, "seed": 4, "max_tokens": WHOLE_SEARCH}
    vote = {"sample_join": "vote"}
    done = client(server).completions.create(model=NAME, prompt=PROMPT, n=3, extra_body=vote, **sampled)
    (choice,) = done.choices
    samples = done.model_extra["braid"]["samples"]
    assert len(samples) == 3 and [s["chosen"] for s in samples].count(True) == 1, samples
    chosen = next(s for s in samples if s["chosen"])
    assert sum(s["answer"] == chosen["answer"] for s in samples) >= max(
        sum(s["answer"] == other["answer"] for s in samples) for other in samples
    ), samples  # the most common answer
    assert done.usage.completion_tokens > sum(t["generated_tokens"] for t in done.model_extra["braid"]["threads"])
    extra = {**vote, "thread_events": True}
    chunks = list(client(server).completions.create(model=NAME, prompt=PROMPT, n=3, stream=True, extra_body=extra,
                                                    **sampled))  # fmt: skip
    events = [c.model_extra["braid"] for c in chunks if c.model_extra.get("braid", {}).get("event") == "sample"]
    assert len(events) == 3  # one as each sample finished, before the answer
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text  # same seeds, same vote
    end = time.monotonic() + 10
    while alive_joins() > 1:  # each request's Join ended with it; one is kept started for the next
        assert time.monotonic() < end, f"{alive_joins()} Join actors alive"
        time.sleep(0.2)


@pytest.mark.parametrize(("stream", "n"), [(True, 1), (False, 1), (True, 2), (False, 2)])
def test_a_client_gone_mid_request_has_its_threads_cancelled_and_kv_freed(server, stream: bool, n: int) -> None:
    # A test problem the search cannot solve: greedy, the model runs its whole search, ~49
    # threads and ~2,550 tokens, unless it is stopped (were it to end sooner, the checks below
    # say so). Two threads at a time (the rest wait): seconds, not the ~1 s of its critical
    # path, in which a busy machine could deliver the first chunk after the search had ended.
    # With n = 2, the samples run through a Join actor, which ends too.
    body = {"prompt": "55 42 17 4>57\n", "max_tokens": 4000, "temperature": 0.0, "stream": stream, "n": n,
            "max_threads": 2}  # fmt: skip
    replica = ray.get(ray.get_actor("braid-coordinator", namespace="braid").replica.remote(0))
    gone = client_gone_count(server)
    if stream:
        reply = requests.post(f"{server[0]}/v1/completions", json=body, headers=AUTH, stream=True, timeout=60)
        first = next(line for line in reply.iter_lines() if line)
        # Under way: it holds KV (read under the replica's lock; its running threads, read without,
        # can be none for an instant: a step has just parked a parent and not yet queued its children).
        assert reply.status_code == 200 and ray.get(replica.cache_report.remote())["used_blocks"] > 0, first
        reply.close()  # the client goes away
    else:
        try:  # the client gives up after 0.5 s and goes away
            reply = requests.post(f"{server[0]}/v1/completions", json=body, headers=AUTH, timeout=(10, 0.5))
            pytest.fail(f"answered within 0.5 s: {reply.status_code} {reply.text[:300]}")
        except requests.ReadTimeout:
            pass
    start = time.monotonic()
    while threads(replica) or ray.get(replica.cache_report.remote())["used_blocks"]:
        assert time.monotonic() - start < 5, "the request's threads still run after its client left"
        time.sleep(0.1)
    while client_gone_count(server) < gone + 1:  # counted when the cancel reaches the ingress
        assert time.monotonic() - start < 10, "the client's leaving was not counted"
        time.sleep(0.1)
    assert client_gone_count(server) == gone + 1
    while alive_joins() > 1:
        assert time.monotonic() - start < 10, "the request's Join actor outlived it"
        time.sleep(0.1)
    assert requests.post(f"{server[0]}/v1/completions", json={"prompt": PROMPT}, headers=AUTH, timeout=120).ok


# Starlette streams two ways: with a disconnect listener (ASGI 2.0), without (2.4).
@pytest.mark.parametrize("spec_version", ["2.0", "2.4"])
@pytest.mark.parametrize("client_leaves", [True, False])
def test_an_event_stream_is_closed_and_its_request_released_however_it_ends(spec_version: str, client_leaves: bool):
    # The client goes away while the response sends the second event: Serve cancels the
    # response there, with its generator suspended at a `yield` (a flaky full-suite run kept a
    # Join request's key slot for good this way). Its cleanup runs at once all the same.
    closed: list[bool] = []
    generator_state: list[str] = []

    async def events():
        try:
            for i in range(3):
                yield f"data: {i}\n\n"
            generator_state.append("done")
        finally:
            generator_state.append("closed")

    async def run() -> None:
        sending = asyncio.Event()
        sent: list[bytes] = []

        async def send(message: dict) -> None:
            sent.append(message.get("body", b""))
            if client_leaves and len(sent) == 3:  # response start, first event, second event
                sending.set()
                await asyncio.Event().wait()  # the client's socket is gone: this send never returns

        async def receive() -> dict:
            await asyncio.Event().wait()  # no disconnect message: Serve cancels the request instead
            return {}

        scope = {"type": "http", "asgi": {"spec_version": spec_version}}
        response = asyncio.ensure_future(EventStream(events(), closed.append)(scope, receive, send))
        if client_leaves:
            await sending.wait()
            response.cancel()
        with pytest.raises(asyncio.CancelledError) if client_leaves else contextlib.nullcontext():
            await response

    asyncio.run(run())
    assert closed == [not client_leaves]  # once: the request's key and Join released, its client counted gone or not
    assert generator_state == (["closed"] if client_leaves else ["done", "closed"])


def client_gone_count(server) -> float:
    text = requests.get(f"http://127.0.0.1:{server[1]}/metrics", timeout=10).text
    rows = [line for line in text.splitlines() if line.startswith('braid_errors_total{kind="client_gone"')]
    return float(rows[0].split()[-1]) if rows else 0.0


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("{not json", 400, "JSON"),
        ({"prompt": PROMPT, "model": "gpt-4"}, 404, "not served here"),
        ({"prompt": PROMPT, "max_latency_s": -1}, 400, "max_latency_s"),
        ({"prompt": PROMPT, "max_latency_s": 1e9}, 400, "max_latency_s"),
        ({"prompt": PROMPT, "protocol": "telepathy"}, 400, "unknown protocol"),
        ({"prompt": PROMPT, "join_policy": "best"}, 400, "unknown join_policy"),
        ({"prompt": PROMPT, "max_tokens": 10**9}, 400, "max_tokens"),
        ({"prompt": "1 " * 2100}, 400, "maximum context length is 2048 tokens"),
        ({"prompt": "1" * (1 << 20)}, 413, "body is over 1048576 bytes"),
        ({"prompt": PROMPT, "n": 17}, 400, "n"),
        ({"prompt": [PROMPT] * 9, "n": 2}, 400, "at most 16 choices"),
        ({"prompt": [1, 2, 3]}, 400, "token-id prompts are not supported"),
        ({"prompt": PROMPT, "presence_penalty": 0.5}, 400, "presence_penalty=0.5 is not supported"),
        ({"prompt": PROMPT, "logit_bias": {"5": 10}}, 400, "logit_bias"),
        ({"prompt": PROMPT, "echo": True}, 400, "echo=True is not supported"),
        ({"prompt": PROMPT, "best_of": 3}, 400, "best_of=3 is not supported"),
        ({"prompt": PROMPT, "logprobs": 21}, 400, "logprobs"),
        ({"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 stop strings"),
        ({"prompt": PROMPT, "stop": "x" * 257}, 400, "1 to 256 characters"),
        ({"prompt": PROMPT, "max_thread": 3}, 400, "max_thread"),  # a misspelt option is not ignored
        ({"max_tokens": 5}, 400, "prompt"),
    ],
)
def test_bad_requests_get_a_clear_4xx_and_the_service_goes_on(server, body, status: int, message: str) -> None:
    data = body if isinstance(body, str) else json.dumps(body)
    reply = requests.post(
        f"{server[0]}/v1/completions", data=data, headers={**AUTH, "Content-Type": "application/json"}, timeout=30
    )
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert message in error["message"] and error["code"] == status
    assert requests.get(f"{server[0]}/readyz", timeout=30).status_code == 200


def test_a_body_of_unknown_length_is_refused_before_it_is_read(server) -> None:
    chunked = (part.encode() for part in ['{"prompt": ', json.dumps(PROMPT), "}"])  # no Content-Length
    reply = requests.post(f"{server[0]}/v1/completions", data=chunked, headers=AUTH, timeout=30)
    assert reply.status_code == 411 and "Content-Length" in reply.json()["error"]["message"]


def prometheus_query(base: str, query: str) -> list:
    reply = requests.get(f"{base}/api/v1/query", params={"query": query}, timeout=10).json()
    assert reply["status"] == "success", (query, reply)
    return reply["data"]["result"]


def test_dashboards_are_valid_grafana_json_and_match_their_builder() -> None:
    from dashboards.build import render

    folder = Path(__file__).resolve().parents[1] / "dashboards"
    rendered = render()
    assert sorted(rendered) == sorted(p.name for p in folder.glob("*.json"))
    for name, text in rendered.items():
        assert (folder / name).read_text() == text, f"{name} is stale: run python -m dashboards.build"
        board = json.loads(text)
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)) and board["uid"] and board["title"]
        assert board["templating"]["list"][0] == {"name": "datasource", "type": "datasource", "query": "prometheus"}
        for panel in board["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"} and panel["targets"]
            assert all(t["expr"] and t["refId"] for t in panel["targets"])


def test_a_real_prometheus_scrapes_the_app_and_every_dashboard_and_alert_query_returns_data(server, tmp_path) -> None:
    import shutil

    import yaml

    from actors.metrics import targets_file
    from dashboards.build import DASHBOARDS

    assert shutil.which("prometheus"), "needs Debian's prometheus package (make test installs it)"
    folder = Path(__file__).resolve().parents[1] / "dashboards"
    checked = subprocess.run(["promtool", "check", "rules", str(folder / "alerts.yml")], capture_output=True)
    assert checked.returncode == 0, checked.stdout
    base_url, metrics_port = server
    targets_file(tmp_path / "targets.json", "127.0.0.1", [metrics_port, metrics_port + 1], "model")
    config = yaml.safe_load((folder / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(folder / "alerts.yml")]
    config["scrape_configs"][0]["file_sd_configs"] = [{"files": [str(tmp_path / "targets.json")]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 60
        while len(prometheus_query_safe(base, 'up{job="braid"} == 1')) < 2:
            assert time.monotonic() < end, f"Prometheus never scraped both Braid processes: {scrapes(base, prom)}"
            time.sleep(0.5)
        # Traffic after the first scrapes, so that rates see it: answered, budgeted, refused, bad.
        oai = client(server)
        for _ in range(2):
            budget = {"max_latency_s": 60}
            oai.completions.create(model=NAME, prompt=PROMPT, max_tokens=WHOLE_SEARCH, extra_body=budget)
        for body in ({"prompt": PROMPT, "max_latency_s": 1e-4}, {"prompt": PROMPT, "protocol": "x"}):
            requests.post(f"{base_url}/v1/completions", json=body, headers=AUTH, timeout=30)
        time.sleep(4)  # a few more scrapes
        for title, panels in DASHBOARDS.items():
            for name, _unit, queries in panels:
                for query in queries:
                    assert prometheus_query(base, query), f"{title} / {name}: no data for {query}"
        rules = yaml.safe_load((folder / "alerts.yml").read_text())["groups"][0]["rules"]
        for rule in rules:
            prometheus_query(base, rule["expr"])  # evaluates (firing or not)
            assert prometheus_query(base, rule["annotations"]["query"]), f"{rule['alert']}: no data"
    finally:
        prom.terminate()
        prom.wait(timeout=30)


def scrapes(base: str, prom: subprocess.Popen) -> str:
    """What Prometheus says of its targets, or that it is not running (a failure's message)."""
    if prom.poll() is not None:
        return f"prometheus exited with {prom.returncode}"
    try:
        targets = requests.get(f"{base}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    except requests.ConnectionError:
        return "prometheus does not answer"
    return "; ".join(f"{t['scrapeUrl']}: {t['health']} {t['lastError']}" for t in targets)


def prometheus_query_safe(base: str, query: str) -> list:
    try:
        return prometheus_query(base, query)
    except requests.ConnectionError:
        return []  # not up yet


def test_the_serve_config_file_builds_the_app() -> None:
    import yaml

    from cluster.serve import build

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster" / "serve-config.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "cluster.serve:build"
    built = build({k: str(v) for k, v in app["args"].items()})  # serve passes the args as given
    assert type(built).__name__ == "Application"
    with pytest.raises(ValueError, match="unknown argument"):
        build({"num_replica": "2"})
