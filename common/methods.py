"""The federated methods a run can use, as a registry: what clients train and send, and how past tasks combine.

Only the server merge differs between them (server/strategy.py); clients read the same entry to know what
to send, so the two sides never disagree about a reply's contents.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    alternate: bool  # LoRM's B, A, B, ... rounds; otherwise ``factors`` every round
    factors: str  # trained in every round when not alternating: "AB" or "B"
    round_grams: bool  # replies carry input Grams (the closed-form merges need them)
    task_end_grams: bool  # a Gram query at each task end (LoRM's cross-task fold)
    past_mode: str  # "mean": train on W0, Grams through W0 + mean delta (LoRM); "sum": train on W0 + past deltas

    def schedule(self, rounds: int) -> list[str]:
        if self.alternate:  # B first: with B = 0, A gets no gradient
            return ["B" if r % 2 == 0 else "A" for r in range(rounds)]
        return [self.factors] * rounds


METHODS: dict[str, Method] = {
    # closed-form merges of the trained factor, cross-task RegMean over task deltas (the paper)
    "lorm": Method("lorm", alternate=True, factors="", round_grams=True, task_end_grams=True, past_mode="mean"),
    # A and B averaged separately, weighted by samples; task deltas summed into the backbone
    "fedavg-lora": Method("fedavg-lora", False, "AB", round_grams=False, task_end_grams=False, past_mode="sum"),
    # A frozen at its shared random init, B averaged (Sun et al., 2024)
    "ffa-lora": Method("ffa-lora", False, "B", round_grams=False, task_end_grams=False, past_mode="sum"),
    # RegMean on every client's full delta B_i A_i (kept exactly in low-rank form), summed across rounds/tasks
    "regmean": Method("regmean", False, "AB", round_grams=True, task_end_grams=False, past_mode="sum"),
}
