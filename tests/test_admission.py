"""Admission by predicted completion and the load-adaptive fan-out (`actors.admission`), as
plain classes: what a replica's measured steps and a request's learned cost predict, and
what is admitted, narrowed or refused because of it."""

from __future__ import annotations

import math

import pytest

from actors.admission import (
    ADMIT_SHARE,
    MARGIN_WINDOW,
    STEP_WINDOW,
    Admission,
    Cost,
    Costs,
    Decision,
    ReplicaModel,
    StepTimes,
)

WIDTHS = (None, 2)  # the embedded model's: its own fan-out, or 2 at the root
PRIOR = Cost(1000.0, 1000.0)


def replica(step_ms: float = 10.0, cap: int = 32) -> ReplicaModel:
    """A replica whose step takes `step_ms` whatever it computes (capacity cap / step tokens a second)."""
    return ReplicaModel(StepTimes({1: step_ms / 1000, cap: step_ms / 1000}), cap)


def learned() -> Admission:
    """Costs as the embedded model's: its own fan-out 2000 tokens, 400 on the critical path;
    capped at 2, half the tokens."""
    admission = Admission(1, now=0.0)
    admission.costs.observe("threadweaver", None, 2000, 400, ended=True)
    admission.costs.observe("threadweaver", 2, 1000, 300, ended=True)
    return admission


def admit(admission: Admission, now: float, budget_s: float = 10.0, models: list[ReplicaModel] | None = None):
    return admission.admit(budget_s, "threadweaver", WIDTHS, models or [replica()], now, PRIOR)


def test_step_times_per_bucket_interpolate_and_clip_outliers() -> None:
    steps = StepTimes()
    steps.observe(16, 2.0)  # the first step after start, lazy initialisation and all
    for _ in range(10):
        steps.observe(4, 0.004)
        steps.observe(16, 0.010)
    steps.observe(4, 5.0)  # a pause of the process: counted as twice the median at most
    steps.refresh()  # (a replica averages when it reports its load)
    assert steps.at(4) == pytest.approx(0.004 * 12 / 11) and steps.at(16) == pytest.approx(0.010 * 12 / 11)
    steps.observe(4, 0.004)
    steps.refresh()
    at4, at16 = steps.at(4), steps.at(16)
    assert steps.at(10) == pytest.approx((at4 + at16) / 2)  # between buckets 4 and 16
    assert steps.at(64) == pytest.approx(4 * at16)  # above what was seen: in proportion, pessimistic
    for _ in range(STEP_WINDOW):
        steps.observe(16, 0.020)  # the machine got slower: the recent steps tell
    steps.refresh()
    assert steps.at(16) == pytest.approx(0.020)


def test_costs_learn_per_cap_and_a_cut_request_only_raises_them() -> None:
    costs = Costs()
    assert costs.get("threadweaver", 2, WIDTHS) is None
    costs.observe("threadweaver", None, 2000, 400, ended=True)
    assert costs.get("threadweaver", 2, WIDTHS).tokens == 2000  # unseen cap: the wider one's cost
    costs.observe("threadweaver", 2, 1000, 300, ended=True)
    costs.observe("threadweaver", 2, 100, 30, ended=False)  # cut short: it needed more than this
    assert costs.get("threadweaver", 2, WIDTHS).tokens == 1000
    costs.observe("threadweaver", 2, 500, 200, ended=True)
    assert 500 < costs.get("threadweaver", 2, WIDTHS).tokens < 1000


def test_the_fan_out_narrows_as_load_rises_and_widens_when_it_falls() -> None:
    admission = learned()
    first = admit(admission, now=0.0)
    assert first.replica == 0 and first.width is None  # idle: the model's own fan-out
    assert first.predicted_s == pytest.approx(4.0, rel=0.01)  # 400 critical-path steps of 10 ms
    keys = [admission.started(first)]
    widths = []
    for i in range(1, 8):  # one a second: 1000+ tokens a second asked, capacity 3200
        decision = admit(admission, now=0.1 * i)
        widths.append(decision.width)
        if decision.replica is not None:
            keys.append(admission.started(decision))
    assert widths[0] is None and widths[-1] == 2  # narrowed once the backlog grew
    assert all(w == 2 for w in widths[widths.index(2) :])
    for key in keys:  # all answered, as predicted
        admission.finished(0, key, 4.0, ended=True)
    assert admit(admission, now=30.0).width is None  # idle again, and nothing asked lately: wide


def test_under_a_flood_only_the_narrowest_cap_is_given() -> None:
    admission = learned()
    decisions = [admit(admission, now=0.0) for _ in range(5)]  # five at once, none started: no backlog
    # Each asks 1000 tokens (at cap 2) of a replica computing 3200 a second: over half of it from the third on.
    assert [d.width for d in decisions] == [None, None, 2, 2, 2]


def test_a_request_predicted_not_to_fit_is_refused_with_a_retry_time() -> None:
    admission = learned()
    admitted = 0
    while (decision := admit(admission, now=0.0)).replica is not None:
        admission.started(decision)
        admitted += 1
    # 3200 tokens a second for 7.5 s: about 24 requests of 1000 tokens fit in their budget.
    assert 15 <= admitted <= 24
    assert decision.retry_after_s >= 1.0
    assert admit(admission, now=0.0, budget_s=2.0).replica is None  # 300 steps of 10 ms: more than 0.75 x 2 s
    later = admit(admission, now=decision.retry_after_s + 0.5)  # the backlog drained in the meantime
    assert later.replica == 0 and later.predicted_s <= ADMIT_SHARE * 10.0


def test_no_admitted_request_is_pushed_past_its_deadline() -> None:
    admission = learned()
    while (decision := admit(admission, now=0.0)).replica is not None:
        admission.started(decision)
    admission.scale = 1.3  # latencies measured since: the last ones admitted now end just before 10 s
    # An urgent request would run first (earliest deadline) and make them late: refused.
    assert admit(admission, now=0.0, budget_s=9.0).replica is None
    assert admit(admission, now=0.0, budget_s=30.0).replica == 0  # one that waits for them fits


def test_the_prediction_is_corrected_by_measured_latencies_but_never_locks_a_replica_out() -> None:
    def two_at_once(admission: Admission) -> tuple[float, float]:
        first = admit(admission, now=1e4, budget_s=30.0)
        admission.started(first)
        return first.predicted_s, admit(admission, now=1e4, budget_s=30.0).predicted_s

    admission = learned()
    for i in range(30):  # requests alone take 6 s where the model says 4 s
        decision = admit(admission, now=100.0 * i, budget_s=30.0)
        key = admission.started(decision)
        admission.finished(0, key, 6.0, ended=True)
    assert admission.scale == pytest.approx(1.5, rel=0.05)
    idle, busy = two_at_once(admission)
    fresh_idle, fresh_busy = two_at_once(learned())
    assert busy == pytest.approx(1.5 * fresh_busy, rel=0.05)  # where others run, the correction applies
    assert idle == fresh_idle  # an idle replica is judged by the model alone: a correction grown too
    # large (say from requests slowed by others) cannot keep requests off it, and so from being corrected


def test_a_request_shaped_by_its_deadline_can_only_raise_the_correction() -> None:
    """Under a backlog a request whose fork was refused at its join time ends soon, having
    searched nothing: taken as a measurement it would say the model is pessimistic and let in
    more (measured here: half of the admitted requests at 4x load shaped so, bench.goodput)."""
    admission = learned()
    for i in range(30):  # each ends in 1 s where the model said 4 s, shaped by its deadline
        key = admission.started(admit(admission, now=100.0 * i, budget_s=30.0))
        admission.finished(0, key, 1.0, ended=False)
    assert admission.scale == 1.0
    for i in range(30, 60):  # cut at 6 s: it would have taken longer still
        key = admission.started(admit(admission, now=100.0 * i, budget_s=30.0))
        admission.finished(0, key, 6.0, ended=False)
    assert admission.scale > 1.5


def test_nothing_learned_yet_a_request_is_tried_where_nothing_else_runs() -> None:
    admission = Admission(2, now=0.0)
    models = [replica(), replica()]
    first = admission.admit(10.0, "apr", WIDTHS, models, 0.0, PRIOR)
    assert first.replica == 0 and first.width is None and first.predicted_s is None
    admission.started(first)
    second = admission.admit(10.0, "apr", WIDTHS, models, 0.0, PRIOR)
    assert second.replica == 1  # replica 0 is busy: its prior says 1000 steps, not in 10 s
    admission.started(second)
    assert admission.admit(10.0, "apr", WIDTHS, models, 0.0, PRIOR).replica is None
    assert math.isfinite(models[0].capacity())


def test_admission_keeps_the_spread_of_its_predictions_within_the_join_time() -> None:
    """Under a backlog admission fills a replica up to the join time, so a request predicted
    just within it overran half the time and was shaped (bench.goodput at 4x: 36 of 157
    admitted shaped, 1 of them solved). The learned margin keeps the predictions' spread in time."""
    admission = learned()
    for i in range(40):  # alone, each predicted at 4 s of a 10 s budget (near its join time); some take 30% longer
        key = admission.started(admit(admission, now=100.0 * i))
        admission.finished(0, key, 5.2 if i % 4 == 0 else 4.0, ended=True)
    assert admission.margin == pytest.approx(0.12)  # the 90th percentile overrun, 1.2 s of the 10 s budget

    def flood(admission: Admission) -> list[Decision]:
        admitted = []
        while (decision := admit(admission, now=1e4)).replica is not None:
            admission.started(decision)
            admitted.append(decision)
        return admitted

    with_margin = flood(admission)
    assert all(d.predicted_s / 10.0 + admission.margin <= ADMIT_SHARE for d in with_margin[1:])
    without = learned()
    without.scale = admission.scale
    assert len(with_margin) < len(flood(without))  # the same model, no margin: a longer queue


def test_the_margin_learns_only_near_deadlines_and_follows_the_overruns_down_too() -> None:
    admission = learned()
    for i in range(40):  # predicted at 4 s of 30 s: no deadline near, whatever they measure
        key = admission.started(admit(admission, now=100.0 * i, budget_s=30.0))
        admission.finished(0, key, 8.0, ended=True)
    assert admission.margin == 0.0 and not admission.overruns
    admission = learned()
    for i in range(40):  # predicted at 4 s of 10 s, each taking 6 s
        key = admission.started(admit(admission, now=100.0 * i))
        admission.finished(0, key, 6.0, ended=True)
    assert admission.margin == pytest.approx(0.2)
    # Then on time, a fifth of them shaped at 7 s: each counts with the latency it had (a
    # floor), not as at least the margin, which would grow it while they go on being shaped.
    for i in range(40, 40 + MARGIN_WINDOW):
        key = admission.started(admit(admission, now=100.0 * i))
        admission.finished(0, key, 7.0 if i % 5 == 0 else 4.0, ended=i % 5 != 0)
    assert admission.margin == pytest.approx(0.3)
    for i in range(200, 200 + MARGIN_WINDOW):  # all on time: the margin is gone
        key = admission.started(admit(admission, now=100.0 * i))
        admission.finished(0, key, 4.0, ended=True)
    assert admission.margin == 0.0
