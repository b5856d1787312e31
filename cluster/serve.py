"""Braid over HTTP: an OpenAI-compatible Ray Serve application.

(No `from __future__ import annotations` here: FastAPI reads the handlers' annotations
at run time to know a body model from a query parameter.)

    braid serve                                   # local Ray, embedded model, http://127.0.0.1:8000
    serve run cluster.serve:build num_replicas=2  # on a running cluster (args: ClusterConfig fields)

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both stream with
server-sent events when `"stream": true`), `GET /v1/models`, `GET /healthz` (the process
is up), `GET /readyz` (the coordinator answers). Braid's options ride in the body:
`max_latency_s`, `max_threads`, `max_depth`, `protocol`, `join_policy`. Every answer
carries `braid`: the thread tree, critical-path tokens, and whether its latency budget
was met. A streamed answer sends thread events (`{"braid": {"event": "forked", ...}}`,
with no choices) between its text chunks, and the tree and usage in its last chunk.

Access: `/v1/*` needs `Authorization: Bearer <API key>` (see `cluster.auth`; off only on
loopback with `braid serve --no-auth`); each key has at most `max_in_flight_per_key`
requests in flight. Health and readiness are open (Kubernetes probes).

Errors use OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`): 400 for a
malformed body, a bad option or a prompt over the limit, 401 for a missing or wrong API
key, 404 for an unknown model, 429 when the cluster is full or the key has too many
requests in flight and 503 when a latency budget is not predicted to be met with the work
queued now (refused at once, never queued; see `actors.admission`), 500 when a replica
fails, 504 when a request runs past its time (`request_timeout_s`, or its budget + 10 s).
A 429 or 503 carries `Retry-After` (seconds).

Every answer's `braid.sla` says how its budget went: `outcome` "met" (it answered on its
own inside the budget), "late", or "truncated" (cut short: a miss), with the latency the
coordinator predicted; `braid.fanout_cap` is the fan-out cap it was given (null: its
own), `braid.accepted` whether the task's check passed its answer (null: no check).
"""

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from actors import metrics
from actors.join import SAMPLE_JOINS, Join
from actors.outcomes import Refused, RequestTimedOut, cause, next_event, time_limit_s
from actors.tasks import task
from cluster.answers import Shape, good_answer, sla_outcome, sse
from cluster.auth import (
    GENERATED_KEY_FILE,
    KEYS_ENV,
    KEYS_FILE_ENV,
    MAX_IN_FLIGHT_PER_KEY,
    Access,
    ApiKeys,
    Denied,
    generated_key,
    read_keys,
)
from cluster.config import ClusterConfig, connect_or_start, init_ray
from cluster.prompts import Prompter, PromptError
from cluster.wire import DEFAULT_MAX_TOKENS, BraidFields, ChatRequest, CompletionRequest

# Serve kills a proxy that is not ready within 5 s; a loaded laptop or a 2-core CI machine
# can take longer to start one. Applied to the local clusters `braid serve` (and the tests) start.
PATIENT_SERVE = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}
MAX_BODY_BYTES = 1 << 20  # a request body over 1 MiB is refused (413) before it is parsed
MAX_INGRESS_REQUESTS = 4096  # requests one ingress replica takes in at once (admission is the coordinator's)
HEALTH_TIMEOUT_S = 5.0  # the coordinator's health for /readyz and the metrics, at most this long
# The ingress waits this long past a request's time limit (the coordinator's, which ends it
# first with a clear 504) before it gives up on a coordinator that does not answer.
INGRESS_GRACE_S = 10.0
JOIN_CLOSE_S = 5.0  # a Join actor cancels its samples within this before it is killed


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.retry_after_s = retry_after_s


def error_response(
    status: int, message: str, kind: str, param: str | None = None, retry_after_s: float | None = None
) -> JSONResponse:
    """OpenAI's error shape; a refusal says when to retry (`Retry-After`, whole seconds)."""
    headers = None if retry_after_s is None else {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status, headers=headers)


api = FastAPI(title="Braid", description="Serving language models that reason in parallel")


def bad_request(request: Request) -> None:
    """Count a request refused as bad. The model name is on the app the replica serves (Serve
    copies the app into its replica, so a module global would not be the one it set)."""
    metrics.ERRORS.labels(getattr(request.app.state, "model", ""), "bad_request").inc()


@api.middleware("http")
async def _limit_body(request: Request, call_next: Any) -> Any:
    """Refuse a POST body over MAX_BODY_BYTES by its declared length, before it is read; a POST
    must declare it (411), so that no body is read unbounded."""
    if request.method == "POST":
        declared = request.headers.get("content-length", "")
        if not declared.isdigit():
            bad_request(request)
            return error_response(411, "a Content-Length header is required", "invalid_request_error")
        if int(declared) > MAX_BODY_BYTES:
            bad_request(request)
            return error_response(413, f"the request body is over {MAX_BODY_BYTES} bytes", "invalid_request_error")
    return await call_next(request)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    bad_request(request)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
    return error_response(400, message, "invalid_request_error", where)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """FastAPI's own errors (an unknown path, a wrong method) in OpenAI's shape too."""
    return error_response(exc.status_code, str(exc.detail), "invalid_request_error")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    if exc.status in (400, 404):  # 401 and 429 are counted where they are raised
        bad_request(request)
    return error_response(exc.status, exc.message, exc.kind, exc.param, exc.retry_after_s)


async def end_join(join: Any) -> None:
    """Cancel what a Join actor still runs (its samples, on their replicas), then end it."""
    with contextlib.suppress(ray.exceptions.RayError, TimeoutError):  # gone already, or stuck: killed all the same
        await asyncio.wait_for(join.close.remote(), JOIN_CLOSE_S)
    ray.kill(join)


class EventStream(StreamingResponse):
    """Server-sent `events`, and `close(ended)` run once however the response ends: sent to
    its end (`ended`), or cut off when the client went away. Serve then cancels the response
    where it waits: at a `send`, the generator would stay suspended at its `yield`, its
    `finally` run only when the garbage collector finds it (seconds later, or minutes: the
    cancel's traceback holds its frame), so the request's cleanup cannot live there."""

    def __init__(self, events: AsyncIterator[str], close: Callable[[bool], None]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.close = close
        self.ended = False

    async def stream_response(self, send: Send) -> None:
        await super().stream_response(send)
        self.ended = True  # every event sent, the last one included

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()  # no await inside: completes though cancelled
            finally:
                self.close(self.ended)


# Serve's own default (a handful of requests per ingress replica, the rest queued in front of
# it) would queue requests before Braid's admission control sees them: let them all through,
# the coordinator answers 429/503 at once past its limits.
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MAX_INGRESS_REQUESTS)
@serve.ingress(api)
class BraidAPI:
    def __init__(self, config: ClusterConfig, defaults: dict[str, Any], access: Access) -> None:
        self.keys = ApiKeys(access)  # first: a server nobody may call must not start
        if config.detached:  # a cluster that outlives this process stops once this app is gone
            config = dataclasses.replace(config, serve_app=serve.get_replica_context().app_name)
        self.config = config
        self.model = api.state.model = config.model_name
        self.defaults = defaults
        self.prompter = Prompter(config.model_path)
        self.task = task(config.task, config.verifier)
        self._ending: set[asyncio.Task] = set()  # Join actors being ended
        if config.metrics_port is not None:
            metrics.serve_metrics(config.metrics_port, host=config.metrics_host)
            metrics.sample_series(self.model, SAMPLE_JOINS)
        # A cluster running with another configuration (a redeploy: `serve deploy` with a new
        # config, a Helm change) is replaced, so the replicas serve what the ingress says.
        self.coordinator = connect_or_start(config, replace=True)
        self._spare_join = self._start_join()
        if config.metrics_port is not None:
            metrics.report_cluster_health(self._health, self.model)

    @api.get("/healthz")
    @api.get("/health")  # vLLM's name for it
    def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Ready while the coordinator answers and at least one replica is live."""
        try:
            health = await asyncio.wait_for(self.coordinator.health.remote(), HEALTH_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as error:
            return error_response(503, f"coordinator not ready: {error or 'no answer'}", "unavailable")
        if not health["live"]:
            return error_response(503, f"no replica is live (of {health['configured']})", "unavailable")
        return JSONResponse({"status": "ready", "replicas": health["configured"], "live_replicas": health["live"]})

    def _health(self) -> dict | None:
        """The coordinator's health, for the metrics (read in the metrics server's thread)."""
        try:
            return ray.get(self.coordinator.health.remote(), timeout=HEALTH_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError):
            return None

    @api.get("/v1/models")
    async def models(self, authorization: str | None = Header(None)) -> dict:  # async: keys counted on one loop
        self.keys.release(self._admit(authorization))
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "braid"}]}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, authorization: str | None = Header(None)) -> Any:
        received = time.time()  # the request's latency budget counts from here
        return await self._answer(body, chat=False, key=self._admit(authorization), received=received)

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, authorization: str | None = Header(None)) -> Any:
        received = time.time()
        return await self._answer(body, chat=True, key=self._admit(authorization), received=received)

    def _admit(self, authorization: str | None) -> str | None:
        try:
            return self.keys.admit(authorization)
        except Denied as denied:
            metrics.ERRORS.labels(self.model, "unauthorized" if denied.status == 401 else "key_busy").inc()
            kind = "authentication_error" if denied.status == 401 else "rate_limit_error"
            retry = None if denied.status == 401 else 1.0
            raise ApiError(denied.status, denied.message, kind, retry_after_s=retry) from None

    async def _answer(self, body: BraidFields, chat: bool, key: str | None, received: float) -> Any:
        """The answer; `key` (admitted) is released when it is complete, for a stream at its end."""
        response = None
        try:
            response = await self._respond(body, chat, key, received)
            return response
        finally:
            if not isinstance(response, StreamingResponse):
                self.keys.release(key)

    async def _respond(self, body: BraidFields, chat: bool, key: str | None, received: float) -> Any:
        if body.model is not None and body.model != self.model:
            raise ApiError(404, f"model {body.model!r} is not served here; GET /v1/models lists {self.model!r}",
                           param="model")  # fmt: skip
        try:
            if isinstance(body, ChatRequest):
                prompts = [self.prompter.chat(body.chat())]
            else:
                prompts = [self.prompter.completion(prompt) for prompt in body.prompts()]
            self.prompter.check(prompts)
            options = body.options(self.defaults, body.requested_tokens() or DEFAULT_MAX_TOKENS)
        except PromptError as error:
            raise ApiError(400, str(error), param="messages" if chat else "prompt") from error
        except ValueError as error:
            raise ApiError(400, str(error)) from error
        policy = body.sample_join
        if policy == "first_success" and self.task.accepted is None:
            raise ApiError(400, "sample_join first_success needs a verifier: serve with --verifier module:function",
                           param="sample_join")  # fmt: skip
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        shape = Shape(request_id, self.model, chat, options, body.n if policy == "all" else 1, body.timeline,
                      include_usage, self.prompter.token_text)  # fmt: skip
        end = received + time_limit_s(options, self.config.request_timeout_s) + INGRESS_GRACE_S  # time.time()
        # One prompt, one sample: the coordinator's request. Else a Join actor for the request's
        # samples (actors.join): it places them over the replicas and joins them.
        join = self._take_join() if len(prompts) * body.n > 1 else None
        try:
            if body.stream:
                if join is None:
                    events = self.coordinator.stream.remote(prompts[0], options, received)
                else:
                    events = join.stream.remote(prompts, options, body.n, policy, received)
                try:  # admitted: a refusal raises here, before the 200 is sent
                    await asyncio.wait_for(next_event(events), end - time.time())
                except (ray.exceptions.RayError, TimeoutError) as error:
                    ray.cancel(events)
                    raise self._failed(error, options) from error
                stream = self._stream(events, options, shape, body.thread_events, end)
                close = functools.partial(self._stream_closed, key, join)
                join = None  # the stream ends it
                return EventStream(stream, close)
            if join is None:
                call = self.coordinator.generate.remote(prompts[0], options, received)
            else:
                call = join.run.remote(prompts, options, body.n, policy, received)
            try:
                answer = await asyncio.wait_for(call, end - time.time())
            except BaseException as error:
                # Not recursive: the coordinator ends each request on its replica itself, and a
                # recursive cancel could cancel that very call on its way.
                ray.cancel(call, recursive=False)
                if isinstance(error, asyncio.CancelledError):  # the client went away (Serve cancels its request)
                    metrics.ERRORS.labels(self.model, "client_gone").inc()
                    raise
                if isinstance(error, ray.exceptions.TaskCancelledError):  # the same, Serve's cancel first
                    metrics.ERRORS.labels(self.model, "client_gone").inc()
                    raise asyncio.CancelledError from error
                if isinstance(error, ray.exceptions.RayError | TimeoutError):
                    raise self._failed(error, options) from error
                raise
        finally:
            if join is not None:
                self._end_join(join)
        results = [answer] if join is None else answer["results"]
        for result in results:
            self._observe(result, options)
        if join is not None:
            self._observe_samples(answer["stats"], policy)
        return shape.response(results)

    async def _stream(
        self, events: Any, options: dict, shape: Shape, thread_events: bool, end: float
    ) -> AsyncIterator[str]:
        """The stream of an admitted request (`events`: the coordinator's or its Join's, past
        "admitted"; a Join's events carry their choice's `index`), given up at `end`
        (time.time()) if they stop coming. When the client goes away mid-stream, Serve cancels
        this request, and Ray the tasks it started (recursively) down to the replicas' streams,
        which cancels the requests there: their threads stop and their KV is freed."""
        results: dict[int, dict] = {}
        try:
            while (event := await asyncio.wait_for(next_event(events), end - time.time())) is not None:
                index = event.get("index", 0)
                if event["type"] == "text":
                    yield sse(shape.chunk(index, event["text"], event.get("logprobs")))
                elif event["type"] in ("thread", "sample"):
                    if thread_events:
                        yield sse(shape.thread_event(index, event))
                elif event["type"] == "stats":
                    self._observe_samples(event["stats"], event["policy"])
                elif event["type"] == "error":
                    timed_out = event.get("timed_out", False)
                    metrics.ERRORS.labels(self.model, "timed_out" if timed_out else "replica_failed").inc()
                    code = 504 if timed_out else 500
                    yield sse({"error": {"message": event["error"], "type": "server_error", "code": code}})
                else:
                    results[index] = event["result"]
                    self._observe(event["result"], options)
                    yield sse(shape.finish_chunk(index, event["result"]))
            if shape.include_usage and results:
                yield sse(shape.usage_chunk(results))
        except (ray.exceptions.RayError, TimeoutError) as error:
            ray.cancel(events)  # the rest of the request goes with the failed part
            failure = self._failed(error, options)
            yield sse({"error": {"message": failure.message, "type": failure.kind, "code": failure.status}})
        yield "data: [DONE]\n\n"

    def _stream_closed(self, key: str | None, join: Any, ended: bool) -> None:
        """A stream's end (`EventStream`): its key's slot and its Join actor are released."""
        self.keys.release(key)
        if join is not None:
            self._end_join(join)
        if not ended:
            metrics.ERRORS.labels(self.model, "client_gone").inc()

    def _take_join(self) -> Any:
        """A new Join actor for this request. One is started ahead, so that a request does not
        wait for a process to start (about 0.5 s, and seconds on a busy 2-core machine)."""
        join = self._spare_join
        self._spare_join = self._start_join()
        return join

    def _start_join(self) -> Any:
        config = self.config
        return Join.remote(self.coordinator, config.task, config.verifier, config.request_timeout_s)

    def _end_join(self, join: Any) -> None:
        """End a request's Join actor (its samples cancelled first), without waiting here: a
        cancelled request's cleanup must not await."""
        ending = asyncio.ensure_future(end_join(join))
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)

    def _observe_samples(self, stats: dict, policy: str) -> None:
        """A multi-sample request's figures (`actors.join.Samples.stats`)."""
        metrics.SAMPLES.labels(self.model, policy).observe(stats["samples"])
        for agreement in stats["agreement"]:
            metrics.VOTE_AGREEMENT.labels(self.model).observe(agreement)
        metrics.VERIFIER_REJECTS.labels(self.model).inc(stats["rejects"])
        metrics.SAMPLES_CANCELLED.labels(self.model).inc(stats["cancelled"])
        if stats["first_success_s"] is not None:
            metrics.FIRST_SUCCESS.labels(self.model).observe(stats["first_success_s"])

    def _failed(self, error: BaseException, options: dict) -> ApiError:
        refused = cause(error, Refused)
        if refused is not None:
            busy = refused.status == 429
            metrics.ERRORS.labels(self.model, "refused_busy" if busy else "refused_budget").inc()
            kind = "rate_limit_error" if busy else "unavailable"
            return ApiError(refused.status, refused.reason, kind, retry_after_s=refused.retry_after_s)
        if isinstance(error, ray.exceptions.ActorUnavailableError):  # Ray is restarting the coordinator
            metrics.ERRORS.labels(self.model, "unavailable").inc()
            message = "the coordinator is restarting; retry in a few seconds"
            return ApiError(503, message, "unavailable", retry_after_s=5)
        timed_out = cause(error, RequestTimedOut)
        if timed_out is not None or isinstance(error, TimeoutError):
            metrics.ERRORS.labels(self.model, "timed_out").inc()
            message = str(timed_out) if timed_out else "the coordinator did not answer within the request's time limit"
            return ApiError(504, message, "timeout")
        metrics.ERRORS.labels(self.model, "replica_failed").inc()
        return ApiError(500, f"the request failed: {str(error).splitlines()[0]}", "server_error")

    def _observe(self, result: dict, options: dict) -> None:
        protocol = options.get("protocol", "")
        metrics.REQUESTS.labels(self.model, protocol, result["finish_reason"]).inc()
        metrics.LATENCY.labels(self.model, protocol).observe(result["latency_s"])
        metrics.THREADS.labels(self.model, protocol).observe(len(result["threads"]))
        metrics.CRITICAL_PATH.labels(self.model, protocol).observe(result["usage"]["critical_path_tokens"])
        forks: dict[tuple[int, int], int] = {}
        for node in result["threads"]:
            if node["parent_id"] is not None:
                key = (node["parent_id"], node["fork"])
                forks[key] = forks.get(key, 0) + 1
        for width in forks.values():
            metrics.FANOUT.labels(self.model, protocol).observe(width)
        outcome = sla_outcome(result, options)
        if outcome is not None:
            metrics.SLA.labels(self.model, outcome, str(result["deadline_shaped"]).lower()).inc()
        if good_answer(result, options):
            metrics.GOOD_ANSWERS.labels(self.model, protocol).inc()
        cap = result.get("fanout_cap")
        metrics.FANOUT_CAP.labels(self.model, "none" if cap is None else str(cap)).inc()


REQUEST_DEFAULTS = ("protocol", "join_policy", "max_latency_s", "max_threads", "max_depth")


def task_defaults(name: str) -> dict[str, Any]:
    """The request options a task's model is served with unless a request says otherwise."""
    return dict(task(name).options)


def build(args: dict[str, Any]) -> serve.Application:
    """`serve run cluster.serve:build key=value ...`: ClusterConfig fields as arguments, and
    `max_in_flight_per_key`; in a Serve config file also `defaults`, a mapping of request
    options (REQUEST_DEFAULTS) that apply when a request gives none. API keys are always
    required here, read where the app runs (see `cluster.auth`)."""
    args = dict(args)
    defaults = args.pop("defaults", None) or {}
    access = Access(max_in_flight_per_key=int(args.pop("max_in_flight_per_key", MAX_IN_FLIGHT_PER_KEY)))
    if not isinstance(defaults, dict) or set(defaults) - set(REQUEST_DEFAULTS):
        raise ValueError(f"defaults must be a mapping of {', '.join(REQUEST_DEFAULTS)}; got {defaults!r}")
    BraidFields(**defaults).options({}, DEFAULT_MAX_TOKENS)  # checked as a request's own options would be
    fields = ClusterConfig.__dataclass_fields__
    unknown = set(args) - set(fields)
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(sorted(unknown))}; known: {', '.join(fields)}")
    typed = {k: _parse(fields[k].type, v) for k, v in args.items()}
    config = ClusterConfig(**{"detached": True, **typed})
    return BraidAPI.bind(config, {**task_defaults(config.task), **defaults}, access)


def _parse(kind: Any, value: Any) -> Any:
    if isinstance(value, dict):  # a mapping from a config file (replica_resources): as it is
        return value
    text = str(kind)
    if "bool" in text:
        return str(value).lower() in ("1", "true", "yes")
    if "int" in text:
        return int(value)
    if "float" in text:
        return float(value)
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="braid serve", description="Serve Braid over HTTP (OpenAI API).")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the embedded Countdown model)")
    parser.add_argument("--served-model-name", default=None, help="the name clients ask for (default: the "
                        "checkpoint folder's name)")  # fmt: skip
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="weights and KV (default: the checkpoint's; bf16 for an fp32 one on CUDA)")  # fmt: skip
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--verifier", default=None, help="import path module:function of (prompt, answer) -> bool, "
                        "the answer check for sample_join first_success / vote ties (default: the task's)")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=9400, help="ingress; replicas on the next free ports")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="the address metrics listen on (0.0.0.0: all)")
    parser.add_argument("--targets", type=Path, default=Path("/tmp/braid/prometheus-targets.json"))
    parser.add_argument("--api-keys-file", type=Path, default=None,
                        help=f"API keys, one per line (default: ${KEYS_FILE_ENV}, ${KEYS_ENV}, else one generated "
                             f"into {GENERATED_KEY_FILE})")  # fmt: skip
    parser.add_argument("--no-auth", action="store_true", help="no API keys (only with a loopback --host)")
    parser.add_argument("--max-in-flight-per-key", type=int, default=MAX_IN_FLIGHT_PER_KEY)
    parser.add_argument("--address", default=None, help="a running Ray cluster to use (auto: the one `ray start` "
                        "runs on this machine); default: start a local one")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        keys_file = None if args.no_auth else args.api_keys_file or (None if read_keys(None) else generated_key())
        access = Access(not args.no_auth, keys_file and str(keys_file), args.max_in_flight_per_key)
        access.check_host(args.host)
        ApiKeys(access)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    for name, value in PATIENT_SERVE.items():
        os.environ.setdefault(name, value)
    try:
        config = ClusterConfig(
            num_replicas=args.replicas,
            served_model_name=args.served_model_name,
            dtype=args.dtype,
            verifier=args.verifier,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            **({"model_path": args.model} if args.model else {}),
        )
    except ValueError as error:  # a bad model folder, dtype or import path: said before anything starts
        parser.error(str(error))
    where = init_ray(args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(BraidAPI.bind(config, task_defaults(config.task), access), name="braid")
    ports = [args.metrics_port + i for i in range(args.replicas + 1)]
    metrics.targets_file(args.targets, "127.0.0.1", ports, config.model_name)
    url = f"http://{args.host}:{args.port}"
    print(f"Braid is serving {config.model_name} at {url}/v1 ({args.replicas} replica(s), on {where}).")
    auth = "" if args.no_auth else f"-H \"Authorization: Bearer $(cat {keys_file})\" " if keys_file else \
        "-H \"Authorization: Bearer $BRAID_API_KEY\" "  # fmt: skip
    print(f"  try: curl {url}/v1/completions {auth}-H 'Content-Type: application/json' "
          f"""-d '{{"prompt": "95 91 78 36>72\\n", "max_tokens": 600}}'""")  # fmt: skip
    print(f"  metrics: {', '.join(f'http://127.0.0.1:{p}/metrics' for p in ports)} (targets: {args.targets})")
    print("  Ctrl-C stops it.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
