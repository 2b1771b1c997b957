"""Faults during a run and a server restart, on the real schedule with in-process clients."""

import pytest
import torch

from common.config import RunConfig
from server.state import CheckpointError, ServerState
from server.transport import RoundFailed
from deploy.inprocess import InProcessTransport, run_in_process, schedule_for

RUN = RunConfig(
    backbone="vit_tiny_test", img_size=32, classes_per_task=5, num_tasks=2, rounds_per_task=3, local_epochs=1,
    max_train_per_class=8, max_test_per_class=4, rank=2, alpha_head=0.5, min_clients=2, seed=3,
)
K = 3


class Crash(Exception):
    """Stands for the server process dying between two rounds."""


# slow: three schedules (whole, cut, resumed: 48 client replies), the heaviest in-process test, ~55 s of the
# fast tier's in-process federations (~160 s together on a busy 2-core machine); `pytest` still runs it.
@pytest.mark.slow
def test_a_restarted_server_resumes_where_it_stopped_and_ends_identical(tmp_path):
    whole = run_in_process(schedule_for(RUN, tmp_path / "whole"), InProcessTransport(RUN, K))

    class CrashingTransport(InProcessTransport):
        def exchange(self, *args):
            if self.calls == 5:  # after the start-up check and task 0 (3 rounds + its task end, checkpointed)
                raise Crash()
            return super().exchange(*args)

    with pytest.raises(Crash):
        run_in_process(schedule_for(RUN, tmp_path / "cut"), CrashingTransport(RUN, K))
    resumed = schedule_for(RUN, tmp_path / "cut")
    assert (resumed.state.task, resumed.state.round, len(resumed.state.acc)) == (1, 0, 1)
    final = run_in_process(resumed, InProcessTransport(RUN, K))

    assert final.acc == whole.acc  # the same accuracy matrix, so the same FAA
    for name in whole.A:
        assert torch.equal(final.A[name], whole.A[name]) and torch.equal(final.B[name], whole.B[name])
    for key in ("S", "H"):
        for name, t in getattr(whole.sums, key).items():
            assert torch.equal(getattr(final.sums, key)[name], t)
    assert [h["round"] for h in final.history] == [h["round"] for h in whole.history]


def test_a_fresh_run_starts_from_the_initial_head_even_after_another_run_trained_the_process_model(tmp_path):
    for head_init in ("zeros", "trunc-normal"):
        run = RUN.model_copy(update={"head_init": head_init})
        first = schedule_for(run, tmp_path / f"{head_init}-1")
        built_weight = first.state.head_weight.clone()
        with torch.no_grad():  # what a run's clients and evaluation leave in the process's cached model
            first.exp.model.head.weight.add_(1.0)
            first.exp.model.head.bias.add_(1.0)
        second = schedule_for(run, tmp_path / f"{head_init}-2")
        assert second.exp is first.exp  # one cached experiment per process
        assert torch.equal(second.state.head_weight, built_weight)
        assert torch.equal(second.state.head_bias, torch.zeros_like(second.state.head_bias))
        assert (built_weight == 0).all() == (head_init == "zeros")


def test_a_failing_or_vanished_client_is_left_out_and_the_run_goes_on(tmp_path, caplog):
    faults = {(2, 2): RuntimeError("CUDA out of memory"), (3, 0): "absent", (5, 1): RuntimeError("disk full")}
    transport = InProcessTransport(RUN, K, fault=lambda call, node, kind: faults.get((call, node)))
    state = run_in_process(schedule_for(RUN, tmp_path / "faulty"), transport)
    assert len(state.acc) == 2
    clients = [h["clients"] for h in state.history]
    # call 0 is the start-up check, calls 1-3 task 0's rounds, call 4 its task end, call 5 task 1's first round
    assert clients == [3, 2, 2, 2, 3, 3]
    assert [h["dropped"] for h in state.history] == [0, 1, 0, 1, 0, 0]  # an absent node is not even a reply
    assert [h["partitions"] for h in state.history] == ["0 1 2", "0 1", "1 2", "0 2", "0 1 2", "0 1 2"]
    assert "dropping node 2 (partition 2/3) from task 0 round 1: client error: CUDA out of memory" in caplog.text
    assert "dropping node 1 (partition 1/3) from task 1 round 0: client error: disk full" in caplog.text


def test_below_min_clients_the_round_fails_and_the_checkpoint_stays_resumable(tmp_path):
    transport = InProcessTransport(RUN, K, fault=lambda call, node, kind: "absent" if call == 2 and node else None)
    folder = tmp_path / "starved"
    with pytest.raises(RoundFailed, match="1 valid replies, min-clients is 2"):
        run_in_process(schedule_for(RUN, folder), transport)
    resumed = schedule_for(RUN, folder)
    assert (resumed.state.task, resumed.state.round) == (0, 1)  # round 0 merged, round 1 to do again


def test_a_merge_that_overflows_stops_the_run_and_never_enters_the_state(tmp_path, monkeypatch):
    import common.methods.base as base

    real = base.head_from_sums
    calls = []

    def overflowing(*args, **kwargs):
        W, b = real(*args, **kwargs)
        calls.append(1)
        return (W * 1e300 if len(calls) == 2 else W), b  # finite in float64, inf in float32

    monkeypatch.setattr(base, "head_from_sums", overflowing)
    folder = tmp_path / "overflow"
    with pytest.raises(RoundFailed, match="merged head weight is not finite"):
        run_in_process(schedule_for(RUN, folder), InProcessTransport(RUN, K))
    resumed = schedule_for(RUN, folder)
    assert (resumed.state.task, resumed.state.round) == (0, 1)
    assert torch.isfinite(resumed.state.head_weight).all()


def test_a_corrupt_or_foreign_checkpoint_is_an_error_never_a_fresh_start(tmp_path):
    folder = tmp_path / "c"
    s = schedule_for(RUN, folder)
    s.state.save(s.checkpoint, "test")
    with pytest.raises(CheckpointError, match="other settings"):
        schedule_for(RUN, folder, fingerprint="another run")
    s.checkpoint.write_bytes(s.checkpoint.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="unreadable"):
        schedule_for(RUN, folder)
    torch.save({"version": 99}, s.checkpoint)
    with pytest.raises(CheckpointError, match="not a version-1"):
        ServerState.load(s.checkpoint, "test")
