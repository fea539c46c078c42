"""Collective stop decisions and failure-safe sharded work (rimlens.distributed, run_chunks).

The two-process checks share one pair of real processes (gloo, like ``torchrun`` on CPU) that runs
every scenario in turn: starting torch twice per scenario would cost more than the scenarios. A
rank that hangs (the failure these tests guard against) is caught by the pair's timeout.
"""

import pytest

from ranks import run_two_ranks
from rimlens.distributed import RankFailedError, any_rank, broadcast_object, collective_failure, rank_and_world
from rimlens.io.atomic import claim_work_folder

TIMEOUT_S = 60

# Run by each of the two processes; scenarios run in order, each one's outcome (result or error
# type and message) is recorded, and rank r writes them to result_<r>.json at the end.
WORKER = r"""
import json, os, sys, traceback
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from rimlens.distributed import any_rank, broadcast_object, process_group
from rimlens.inference.sharding import run_chunks

work = Path(sys.argv[1])
SETTINGS = {"n": 7, "chunk_size": 2}
out = {}


def record(name, fn):
    try:
        out[name] = {"result": fn()}
    except Exception as exc:
        out[name] = {"error": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}


with process_group("gloo") as (rank, world):
    assert world == 2
    calls = []

    def compute(start, stop):
        calls.append(start)
        return {"x": np.arange(start, stop)}

    def fails_on_rank_1(start, stop):
        if rank == 1 and start == 2:
            raise ValueError("bad chunk 2")
        return compute(start, stop)

    def chunks(folder, fn):
        calls.clear()
        res = run_chunks(7, 2, work / folder, SETTINGS, fn, "test run", progress=False)
        done = sorted(calls)
        if res is None:
            return {"chunks": None, "computed": done}
        return {"chunks": [r["x"].tolist() for r in res], "computed": done}

    record("any_rank_one", lambda: any_rank(rank == 1))
    record("any_rank_none", lambda: any_rank(False))
    record("broadcast", lambda: broadcast_object({"from": rank}, src=1))
    # compute raises on rank 1 only: both ranks must leave run_chunks
    record("compute_fails", lambda: chunks("fail", fails_on_rank_1))
    # same folder, no failure: only the chunks the failed run did not finish are computed
    record("resume", lambda: chunks("fail", compute))
    # rank 0 refuses a folder left by other settings (pre-created by the test): no rank may hang
    record("claim_refused", lambda: chunks("claimed", compute))
    # the group is still usable after the failures: an ordinary run gathers every chunk on rank 0
    record("normal", lambda: chunks("normal", compute))
    record("any_rank_after", lambda: any_rank(rank == 0))

(work / f"result_{rank}.json").write_text(json.dumps(out))
"""


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Outcomes of every scenario of WORKER, per rank: ``[rank 0's, rank 1's]``."""
    work = tmp_path_factory.mktemp("ranks")
    claim_work_folder(work / "claimed", {"n": 99}, "test run")  # other settings than the worker's
    return run_two_ranks(work, WORKER, TIMEOUT_S)


def _result(outcome):
    assert "error" not in outcome, outcome.get("traceback")
    return outcome["result"]


def test_any_rank_and_broadcast_across_two_processes(two_ranks):
    for rank in range(2):
        o = two_ranks[rank]
        assert _result(o["any_rank_one"]) is True  # only rank 1 passed True
        assert _result(o["any_rank_none"]) is False
        assert _result(o["any_rank_after"]) is True  # only rank 0 passed True, after the failures
        assert _result(o["broadcast"]) == {"from": 1}


def test_compute_error_on_one_rank_ends_both_ranks(two_ranks):
    zero, one = two_ranks[0]["compute_fails"], two_ranks[1]["compute_fails"]
    assert one["error"] == "ValueError" and one["message"] == "bad chunk 2"  # its own error, unchanged
    assert zero["error"] == "RankFailedError"
    assert "rank 1" in zero["message"] and "test run" in zero["message"]


def test_failed_run_resumes_without_redoing_finished_chunks(two_ranks):
    # rank 0 finished its chunks (starts 0 and 4) before it learnt of rank 1's failure
    assert _result(two_ranks[0]["resume"]) == {"chunks": [[0, 1], [2, 3], [4, 5], [6]], "computed": []}
    assert _result(two_ranks[1]["resume"]) == {"chunks": None, "computed": [2, 6]}


def test_refused_work_folder_on_rank_0_ends_both_ranks(two_ranks):
    zero, one = two_ranks[0]["claim_refused"], two_ranks[1]["claim_refused"]
    assert zero["error"] == "RimlensInputError" and "other settings" in zero["message"]
    assert one["error"] == "RankFailedError" and "rank 0" in one["message"]


def test_two_process_run_chunks_gathers_all_chunks_on_rank_0(two_ranks):
    assert _result(two_ranks[0]["normal"]) == {"chunks": [[0, 1], [2, 3], [4, 5], [6]], "computed": [0, 4]}
    assert _result(two_ranks[1]["normal"]) == {"chunks": None, "computed": [2, 6]}


def test_single_process_helpers_are_the_identity():
    assert rank_and_world() == (0, 1)
    assert any_rank(True) is True and any_rank(0) is False and any_rank([1]) is True
    obj = {"a": [1, 2]}
    assert broadcast_object(obj) is obj
    with collective_failure("nothing"):
        pass
    err = ValueError("mine")
    with pytest.raises(ValueError) as info, collective_failure("single"):
        raise err
    assert info.value is err
    assert issubclass(RankFailedError, RuntimeError)


def test_single_process_run_chunks_still_raises_compute_error(tmp_path):
    from rimlens.inference.sharding import run_chunks

    def compute(start, stop):
        if start == 2:
            raise KeyError("boom")
        return {"x": list(range(start, stop))}

    with pytest.raises(KeyError):
        run_chunks(5, 2, tmp_path / "p", {}, compute, progress=False)
    assert sorted(p.name for p in (tmp_path / "p").glob("chunk_*")) == ["chunk_000000000_2.h5"]
