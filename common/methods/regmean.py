"""RegMean (Jin et al., ICLR 2023) of every client's full delta B_i A_i, kept exactly in low-rank form.

Every round trains A and B; the server merges the clients' deltas in closed form,
    dW* = (sum_i B_i A_i G_i) pinv(sum_i G_i) = [B_1 ... B_K] [A_1 G_1 H^+; ...; A_K G_K H^+]
(common/merges.py:regmean_lowrank), which needs every client's B_i and A_i G_i side by side: the terms are
stacked over clients, not summed (so secure aggregation cannot carry them). Each round's merged delta joins the
past and the next round starts a fresh adapter; clients train on W0 + the sum of the past deltas.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from common.layout import Dims, Term
from common.merges import regmean_lowrank, times_gram
from common.methods.base import Adapter, CrossTask, Method, register_method
from common.protocol import ClientReply


@register_method
class RegMean(Method):
    name = "regmean"
    cross_tasks = ("chain",)  # every round's merged delta joins the chain
    round_grams = True

    def schedule(self, rounds: int) -> list[str]:
        return ["AB"] * rounds

    def round_layout(self, factor: str, dims: Dims) -> dict[str, Term]:
        out = {}
        for name in dims.shapes:
            out[f"AG/{name}"] = Term(dims.factor_shape("A", name), over=f"G/{name}", stack=0)
            out[f"B/{name}"] = Term(dims.factor_shape("B", name), stack=1)
            out[f"G/{name}"] = Term(dims.gram(name).shape, gram=True)
        return out

    def backbone_terms(self, factor: str, reply: ClientReply, shared: Adapter) -> dict[str, Tensor]:
        out = {}
        for name, A in reply.trained["A"].items():
            G = reply.grams[name].double()
            out[f"AG/{name}"] = times_gram(A.double(), G)
            out[f"B/{name}"] = reply.trained["B"][name].double()
            out[f"G/{name}"] = G
        return out

    def merge_backbone(
        self, factor: str, sums: Mapping[str, Tensor], adapter: Adapter, ridge: float
    ) -> tuple[dict[str, dict[str, Tensor]], Adapter | None]:
        layers = [key[len("G/"):] for key in sums if key.startswith("G/")]
        A_stack, B_stack = regmean_lowrank(
            {n: sums[f"AG/{n}"] for n in layers}, {n: sums[f"B/{n}"] for n in layers},
            {n: sums[f"G/{n}"] for n in layers}, ridge,
        )
        return {}, (A_stack, B_stack)

    def end_task(self, adapter: Adapter, cross: CrossTask, grams: Mapping[str, Tensor] | None) -> CrossTask:
        return cross  # every round's merged delta is in the past already
