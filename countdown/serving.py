"""The Countdown task as Braid serves it (`actors.tasks`, built in as "countdown"): the join
verifier for children's claims, the fan-out cap written into the prompt, warm-up prompts,
the final answer a vote compares, and the check that an answer solves its problem."""

from __future__ import annotations

from actors.tasks import Task
from countdown import problems
from countdown.traces import SERVE_OPTIONS, cap_prompt, prompt
from countdown.verify import answer_accepted, claims_found, final_answer, verify_claim

WARM_UP_PROBLEMS = 4  # x 2 fan-out caps, at once: enough threads to fill a step (max_step_threads)

TASK = Task(
    verifier=verify_claim,
    succeeded=claims_found,
    accepted=answer_accepted,
    # The root's `T<n>` cap is what the embedded model was trained to follow; under load T2
    # solves most of what the uncapped search does at half its tokens (README: 47.5% against
    # 55.0%); T1 solves 11.5%, T4 53.5% at 0.9x the uncapped search's latency.
    widths=(None, 2),
    cap_prompt=cap_prompt,
    warm_up=tuple(prompt(p) for p in problems.splits(0, WARM_UP_PROBLEMS, 0)["validation"]),
    options=SERVE_OPTIONS,
    answer=final_answer,
)
