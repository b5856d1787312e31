"""Admission by predicted completion, and the fan-out each admitted request gets: the
coordinator's policy for latency budgets, as plain classes.

A replica is modelled by its step time, step(n) seconds for a step that computes n threads
(`StepTimes`, measured by the replica on its own steps), and its cap on threads per step
(`max_step_threads`, K). A request is modelled by its `Cost`: the tokens its threads
generate (W, its work) and its critical path (L, tokens that come one after another),
learned per protocol and fan-out cap from finished requests (`Costs`; a warm-up seeds it).

A replica runs threads earliest deadline first, so a request ends after the work of the
requests with earlier deadlines and its own (requests j in deadline order, up to k):

    finish_k = now + max(sum_j W_j / R, L_k * step(n))     R = n / step(n)

where n = min(K, the threads the admitted requests keep busy: sum_j W_j / L_j): the
throughput bound and the critical-path bound. `Backlog` keeps each replica's admitted
requests and drains their work, in the same order, as time passes. What the model misses
(per-request work outside decode steps, Python and Ray overheads) is corrected by one
learned factor: each finished request's measured latency over its prediction. A request
its deadline shaped (`ForkJoinResult.deadline_shaped`: a fork refused or joined early, a
child cut at its deadline's token budget) did less than its search, so it may raise a cost
and the factor, never lower them.

The factor corrects the median; the spread is what a deadline meets. Under a backlog
admission fills a replica up to the join time, so a request predicted just within it
overran half the time, and one that overruns is shaped and almost never solves (bench.goodput
at 4x load: 36 of 157 admitted shaped, 1 of them solved; measured latency over predicted
0.98 at the median, 1.17 at the 90th percentile). So admission keeps a `margin` free
before the join time: the MARGIN_QUANTILE overrun (measured latency minus predicted, as a
share of the budget) of the last MARGIN_WINDOW requests predicted to end past NEAR_SHARE
of their join time (no deadline is near the others); one shaped counts with the latency
it had, a floor. An overrun in seconds shrinks with the queue ahead, so the margin does
not feed on itself (a margin on the ratio of measured to predicted latency did: a shorter
queue, a larger ratio). A shorter queue costs no throughput while a replica stays busy,
and frees the compute those requests wasted.

`Admission.admit` places a request with a budget: on the replica and at the widest fan-out
cap where it is predicted, with the margin, to end within WIDE_SHARE of its budget, else at
the narrowest cap that ends within ADMIT_SHARE of it (forks join by `EARLY_JOIN` of the budget: past
that its children would be cut), and only where no request already admitted is pushed
past its own deadline. Else it is refused, with the seconds after which it would fit.
Under load only the narrowest cap is given: when the work asked of the cluster lately
(every request with a budget over LOAD_WINDOW_S, refused ones too, at their widest cost)
is over WIDE_LOAD of what its replicas compute with every step full. So the fan-out
is wide while the cluster is idle and narrows as load rises, before anyone is refused:
at the narrowest cap a request solves about as often for half the tokens (Countdown).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from dataclasses import dataclass

from engine.threads import EARLY_JOIN

ADMIT_SHARE = EARLY_JOIN  # of its budget, a request's predicted latency at most, to be admitted
WIDE_SHARE = 0.5  # of its budget, a request's predicted latency at most, to get a wider fan-out
WIDE_LOAD = 0.5  # of the cluster's capacity, the tokens per second asked of it at most, for a wider fan-out
LOAD_WINDOW_S = 10.0  # the work asked of the cluster is counted over this long
MIN_STEPS = 8  # a budget that holds fewer steps than this is refused even before anything is learned
LEFT_FLOOR = 0.05  # of its work, what a request still running is assumed to have left, at least
AVERAGE = 0.2  # weight of the newest request in the cost averages
STEP_WINDOW = 128  # steps a replica's step time per bucket averages over
STEP_CLIP = 2.0  # a step counts as at most this many times its bucket's median
SCALE_WEIGHT = 0.1  # of the newest request in the correction of predicted latency
SCALE_LIMIT = 2.0  # the correction stays within [1 / this, this]
CUT_PENALTY = 1.25  # a request its deadline shaped counts as having needed this much longer, at least
MARGIN_QUANTILE = 0.9  # of the overruns: what admission keeps free before the join time
MARGIN_WINDOW = 64  # finished requests the margin is learned from
MARGIN_LIMIT = 0.5  # of the budget, the margin at most
NEAR_SHARE = 0.5  # of its join time, a request's predicted latency at least, for the margin to learn from it


class StepTimes:
    """A replica's step time by the threads a step computes: in each power-of-two bucket of
    thread counts (1, 2-3, 4-7, ...), the mean of its last STEP_WINDOW steps, each counted
    as at most STEP_CLIP x their median; between buckets interpolated; above the largest
    bucket seen, growing in proportion to the threads (a pessimistic guess until such steps
    are seen). A step is a replica's whole loop iteration: a step that also prefills a
    prompt, a fork or a join (10-50x a decode step) is part of the cost of running requests,
    and the mean keeps it; the clip keeps the first steps after start (lazy initialisation,
    100x a step) and a pause of the process from ruling a bucket seen rarely. A replica
    observes each step (cheap: its step loop is a hot path) and averages when it reports
    (`refresh`); the coordinator gets the averages (`seconds`) and predicts with them."""

    def __init__(self, seconds: dict[int, float] | None = None) -> None:
        self.seconds: dict[int, float] = dict(seconds or {})  # bucket (its smallest count) -> seconds
        self.recent: dict[int, deque[float]] = {}

    def observe(self, threads: int, seconds: float) -> None:
        bucket = 1 << (max(threads, 1).bit_length() - 1)
        self.recent.setdefault(bucket, deque(maxlen=STEP_WINDOW)).append(seconds)

    def refresh(self) -> dict[int, float]:
        """`seconds` from the steps observed, now. (Safe beside a thread that observes: the
        buckets and steps are copied first.)"""
        for bucket, recent in list(self.recent.items()):
            steps = list(recent)
            cap = STEP_CLIP * statistics.median(steps)
            self.seconds[bucket] = sum(min(s, cap) for s in steps) / len(steps)
        return self.seconds

    def at(self, threads: float) -> float:
        if not self.seconds:
            return 0.0
        below = [b for b in self.seconds if b <= threads]
        above = [b for b in self.seconds if b > threads]
        if not below:
            return self.seconds[min(above)]
        lo = max(below)
        if not above:
            return self.seconds[lo] * threads / lo
        hi = min(above)
        return self.seconds[lo] + (self.seconds[hi] - self.seconds[lo]) * (threads - lo) / (hi - lo)


class FullRate:
    """Tokens a replica generated per second of the steps that were full (as many threads as
    it computes at most): what it delivers when saturated, over its last STEP_WINDOW such
    steps."""

    def __init__(self) -> None:
        self.recent: deque[tuple[int, float]] = deque(maxlen=STEP_WINDOW)

    def observe(self, tokens: int, seconds: float) -> None:
        self.recent.append((tokens, seconds))

    def rate(self) -> float:
        steps = list(self.recent)  # a copy: the step loop may append meanwhile
        seconds = sum(s for _, s in steps)
        return sum(t for t, _ in steps) / seconds if seconds > 0 else 0.0


@dataclass(slots=True)
class Cost:
    """A request's expected cost at one fan-out cap (moving averages)."""

    tokens: float  # generated by all its threads
    critical: float  # on its critical path
    spread: float = 0.0  # of the critical path: its average distance from the mean
    count: int = 0  # requests observed

    @property
    def critical_high(self) -> float:
        """A critical path longer than most: what a deadline has to hold."""
        return self.critical + self.spread


class Costs:
    """Expected cost per (protocol, fan-out cap), from finished requests."""

    def __init__(self) -> None:
        self.table: dict[tuple[str, int | None], Cost] = {}

    def get(self, protocol: str, width: int | None, widths: tuple[int | None, ...]) -> Cost | None:
        """The cost at `width`; unseen, that of the nearest wider cap seen (a narrower cap costs no more)."""
        wider = widths[: widths.index(width) + 1] if width in widths else (width,)
        for w in reversed(wider):
            if (protocol, w) in self.table:
                return self.table[protocol, w]
        return None

    def observe(self, protocol: str, width: int | None, tokens: int, critical: int, ended: bool) -> None:
        """A finished request's usage; one cut short (`ended` false) needed at least what it did,
        so it can only raise the estimate."""
        cost = self.table.get((protocol, width))
        if cost is None:
            self.table[protocol, width] = Cost(float(tokens), float(critical), 0.0, 1)
            return
        if not ended:
            tokens, critical = max(tokens, cost.tokens), max(critical, cost.critical)
        cost.spread += AVERAGE * (abs(critical - cost.critical) - cost.spread)
        cost.tokens += AVERAGE * (tokens - cost.tokens)
        cost.critical += AVERAGE * (critical - cost.critical)
        cost.count += 1


@dataclass(slots=True)
class Job:
    """An admitted request, as its replica's backlog sees it (seconds on the coordinator's clock)."""

    deadline: float
    tokens: float  # work left
    critical: float  # critical path left
    floor: float  # tokens it is assumed to have left while it runs, at least
    budget_s: float  # its latency budget
    model_s: float | None = None  # its latency as the model alone predicted it at admission
    predicted_s: float = 0.0  # and as admission predicted it, the correction included

    @property
    def threads(self) -> float:
        return self.tokens / max(self.critical, 1.0)


@dataclass(slots=True)
class ReplicaModel:
    step: StepTimes
    max_step_threads: float  # K (inf: no cap)
    full_rate: float = 0.0  # tokens per second measured while every step was full (0: not yet)

    def capacity(self) -> float:
        """Tokens per second with every step full (inf before any step was measured)."""
        full = self.max_step_threads if math.isfinite(self.max_step_threads) else max(self.step.seconds, default=1)
        step = self.step.at(full)
        rate = full / step if step > 0 else math.inf
        return min(rate, self.full_rate) if self.full_rate else rate

    def rates(self, jobs: list[Job]) -> tuple[float, float]:
        """(step seconds, tokens per second) while `jobs` run: with every step full, at most the
        rate measured so (it counts what the step times leave out: prefills, forks and joins
        of many requests at once)."""
        n = max(1.0, min(self.max_step_threads, sum(j.threads for j in jobs)))
        step = max(self.step.at(n), 1e-6)
        rate = n / step
        if n >= self.max_step_threads and self.full_rate:
            rate = min(rate, self.full_rate)
        return step, rate


class Backlog:
    """One replica's admitted requests, their work drained earliest deadline first."""

    def __init__(self, now: float) -> None:
        self.jobs: dict[int, Job] = {}
        self.at = now

    def drain(self, now: float, model: ReplicaModel, scale: float) -> None:
        """Take the work done since the last call off the jobs, in deadline order (`scale`:
        measured latency over the model's, see `Admission`)."""
        elapsed, self.at = max(0.0, now - self.at), now
        if not self.jobs or elapsed == 0:
            return
        step, rate = model.rates(list(self.jobs.values()))
        capacity, steps = rate * elapsed / scale, elapsed / (step * scale)
        for job in sorted(self.jobs.values(), key=lambda j: j.deadline):
            if capacity <= 0:
                break
            done = min(1.0, capacity / max(job.tokens, 1e-9), steps / max(job.critical, 1e-9))
            capacity -= done * job.tokens
            job.tokens = max(job.floor, job.tokens * (1 - done))
            job.critical = max(1.0, job.critical * (1 - done))

    def finish_times(self, now: float, model: ReplicaModel, scale: float, extra: Job | None = None) -> dict[int, float]:
        """Predicted end of every job (key -1: `extra`, were it admitted), by the formula above
        times `scale`."""
        jobs = dict(self.jobs) | ({-1: extra} if extra is not None else {})
        step, rate = model.rates(list(jobs.values()))
        ends, ahead = {}, 0.0
        for key, job in sorted(jobs.items(), key=lambda kv: kv[1].deadline):
            ahead += job.tokens
            ends[key] = now + scale * max(ahead / rate, job.critical * step)
        return ends


@dataclass(slots=True, frozen=True)
class Decision:
    replica: int | None  # None: refused
    width: int | None = None
    predicted_s: float | None = None  # latency predicted at admission
    retry_after_s: float = 0.0  # refused: after how long it would fit, roughly
    job: Job | None = None  # what the replica's backlog records for it


class Admission:
    """The coordinator's admission of requests with a latency budget."""

    def __init__(self, num_replicas: int, now: float) -> None:
        self.backlogs = [Backlog(now) for _ in range(num_replicas)]
        self.costs = Costs()
        self.scale = 1.0  # measured latency over the model's prediction (a moving geometric mean)
        self.overruns: deque[float] = deque(maxlen=MARGIN_WINDOW)  # measured minus predicted, of the budget
        self.margin = 0.0  # their MARGIN_QUANTILE, at least 0
        self.arrivals: deque[tuple[float, float]] = deque()  # (when, tokens) of recent requests with a budget
        self._keys = itertools.count()

    def admit(
        self, budget_s: float, protocol: str, widths: tuple[int | None, ...], models: list[ReplicaModel],
        now: float, prior: Cost, exclude: frozenset[int] = frozenset(),
    ) -> Decision:  # fmt: skip
        """Where (and how wide) a request with this budget runs, or a refusal; `prior` is its
        cost while nothing is known at a cap, and the most it can cost (its token limits).
        Call `started` with an admitting decision."""
        widest = self.costs.get(protocol, widths[0], widths) or prior
        busy = self._offered(now, min(widest.tokens, prior.tokens)) > WIDE_LOAD * sum(m.capacity() for m in models)
        choices = list(enumerate(widths))[-1:] if busy else list(enumerate(widths))
        best: tuple[tuple[int, float], Decision] | None = None
        late = math.inf
        for index, (backlog, model) in enumerate(zip(self.backlogs, models, strict=True)):
            if index in exclude:
                continue
            backlog.drain(now, model, self.scale)
            # An idle replica is judged by the model alone (the correction at most 1): were the
            # correction ever too high, requests would still be admitted there and correct it.
            # The margin likewise: it is learned only from requests that run.
            scale = self.scale if backlog.jobs else min(self.scale, 1.0)
            margin = self.margin if backlog.jobs else 0.0
            for rank, width in choices:
                cost = self.costs.get(protocol, width, widths)
                tokens = min((cost or prior).tokens, prior.tokens)  # never more than the request may write
                critical = min((cost or prior).critical_high, prior.critical)
                job = Job(now + budget_s, tokens, critical, LEFT_FLOOR * tokens, budget_s)
                if cost is None and not backlog.jobs and budget_s >= MIN_STEPS * model.step.at(1):
                    return Decision(index, width, None, job=job)  # nothing known, nothing else there: try it
                predicted = self._fits(backlog, model, job, now, scale)
                if predicted is None:
                    continue
                job.model_s, job.predicted_s = predicted / scale, predicted
                share = predicted / budget_s + margin
                if share <= ADMIT_SHARE and (share <= WIDE_SHARE or rank == len(widths) - 1):
                    key = (rank, predicted)  # the widest cap, then the soonest end
                    if best is None or key < best[0]:
                        best = (key, Decision(index, width, predicted, job=job))
                    break
                late = min(late, predicted + (margin - ADMIT_SHARE) * budget_s)
        if best is not None:
            return best[1]
        return Decision(None, retry_after_s=max(1.0, late) if late < math.inf else 1.0)

    def _offered(self, now: float, tokens: float) -> float:
        """Tokens per second asked of the cluster lately (before this request, which is counted
        in): every request with a budget, admitted or not, at its widest cost."""
        while self.arrivals and self.arrivals[0][0] < now - LOAD_WINDOW_S:
            self.arrivals.popleft()
        offered = sum(t for _, t in self.arrivals) / max(now - self.arrivals[0][0], 1.0) if self.arrivals else 0.0
        self.arrivals.append((now, tokens))
        return offered

    def _fits(self, backlog: Backlog, model: ReplicaModel, job: Job, now: float, scale: float) -> float | None:
        """The job's predicted latency, or None when it would push an admitted job that was on
        time past its deadline."""
        before = backlog.finish_times(now, model, scale)
        after = backlog.finish_times(now, model, scale, job)
        for key, end in before.items():
            deadline = backlog.jobs[key].deadline
            if end <= deadline < after[key]:
                return None
        return after[-1] - now

    def started(self, decision: Decision) -> int:
        """Record an admitted request on its replica's backlog; its key for `finished`."""
        assert decision.replica is not None and decision.job is not None
        key = next(self._keys)
        self.backlogs[decision.replica].jobs[key] = decision.job
        return key

    def finished(self, replica: int, key: int, latency_s: float, ended: bool) -> None:
        """An admitted request is over: off its backlog, and its latency against the model's
        prediction moves the correction and the margin (`ended` false: shaped by its deadline,
        it would have taken longer still, so it can only raise the correction: a fork refused
        at its deadline ends the request soon, and would otherwise lower it)."""
        job = self.backlogs[replica].jobs.pop(key, None)
        if job is None or not job.model_s:
            return
        if job.predicted_s >= NEAR_SHARE * ADMIT_SHARE * job.budget_s:
            self.overruns.append((latency_s - job.predicted_s) / job.budget_s)
            ranked = sorted(self.overruns)
            self.margin = min(MARGIN_LIMIT, max(0.0, ranked[int(MARGIN_QUANTILE * (len(ranked) - 1))]))
        ratio = latency_s / job.model_s if ended else max(latency_s / job.model_s * CUT_PENALTY, self.scale)
        scale = self.scale ** (1 - SCALE_WEIGHT) * ratio**SCALE_WEIGHT  # a moving geometric mean
        self.scale = min(SCALE_LIMIT, max(1 / SCALE_LIMIT, scale))

    def cancelled(self, replica: int, key: int) -> None:
        """An admitted request that ended with no result (its replica failed, its client left)."""
        self.backlogs[replica].jobs.pop(key, None)
