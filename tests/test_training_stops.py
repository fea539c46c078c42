"""Stop decisions of the training loop: collective under DDP, and a non-finite gradient stops training.

Under DDP each rank reads its own clock, sees its own loss and (with early stopping) its own
validation history; a stop that one rank takes alone leaves the others waiting in the next
all-reduce for ever. Each scenario below makes exactly one rank want to stop, in two real gloo
processes sharing one model; both must end at the same step, and a hang fails on the deadline.
"""

import pytest
import torch

from ranks import run_two_ranks
from rimlens.config import get_preset, with_train_settings
from rimlens.errors import RimlensInputError, TrainingDivergedError
from rimlens.train import Trainer

TIMEOUT_S = 150
pytestmark = pytest.mark.slow  # two processes each train three tiny runs (~35 s)

WORKER = r"""
import gc, json, sys, time, traceback
from pathlib import Path

import torch

torch.set_num_threads(1)

from rimlens.config import get_preset, with_train_settings
from rimlens.distributed import process_group
from rimlens.train import Trainer

work = Path(sys.argv[1])
out = {}
preset = with_train_settings(get_preset("tiny"), {"batch_size": 4, "max_steps": 6, "val_every": 1000,
                                                   "checkpoint_every": 1000, "val_size": 2, "patience": 0})


def scenario(name, settings, patch):
    try:
        t = Trainer(with_train_settings(preset, settings), work / f"{name}_{rank}", progress=False)
        patch(t)
        r = t.train()
        out[name] = {"step": r.step, "stop_reason": r.stop_reason}
    except Exception as exc:
        out[name] = {"error": type(exc).__name__, "message": str(exc), "step": t.step,
                     "traceback": traceback.format_exc()}
    del t
    gc.collect()  # the patches make reference cycles: free the DDP model while its process group exists


def clock_ahead(t):  # rank 1's clock jumps an hour ahead after its first reading: only it is past max_minutes
    if rank == 1:
        readings = []

        def clock():
            readings.append(1)
            return time.monotonic() + (3600.0 if len(readings) > 1 else 0.0)

        t.clock = clock


def nan_loss_at_step_2(t):  # only rank 1 meets a non-finite loss
    real = t.loss
    t.loss = lambda batch: real(batch) * (float("nan") if rank == 1 and t.step == 2 else 1.0)


def worse_on_rank_1(t):  # only rank 1's validation stops improving: only it runs out of patience
    real = t.evaluate
    t.evaluate = lambda *a, **k: {**real(*a, **k), "val_loss": float(t.step) if rank == 1 else 1.0 / t.step}


with process_group("gloo") as (rank, world):
    assert world == 2
    scenario("clock", {"max_minutes": 30.0}, clock_ahead)
    scenario("nan", {}, nan_loss_at_step_2)
    scenario("patience", {"val_every": 1, "patience": 2}, worse_on_rank_1)

(work / f"result_{rank}.json").write_text(json.dumps(out))
"""


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_two_ranks(tmp_path_factory.mktemp("stops"), WORKER, TIMEOUT_S)


def test_one_ranks_clock_stops_every_rank(two_ranks):
    a, b = two_ranks[0]["clock"], two_ranks[1]["clock"]
    assert "error" not in a and "error" not in b, (a.get("traceback"), b.get("traceback"))
    assert a == b == {"step": 1, "stop_reason": "max_minutes"}


def test_a_non_finite_loss_on_one_rank_stops_every_rank(two_ranks):
    for rank in range(2):
        o = two_ranks[rank]["nan"]
        assert o.get("error") == "TrainingDivergedError", o
        assert o["step"] == 2 and "non-finite" in o["message"]


def test_early_stopping_on_one_rank_stops_every_rank(two_ranks):
    a, b = two_ranks[0]["patience"], two_ranks[1]["patience"]
    assert "error" not in a and "error" not in b, (a.get("traceback"), b.get("traceback"))
    assert a == b == {"step": 3, "stop_reason": "early_stopping"}


def test_nan_gradients_with_a_finite_loss_stop_training(tmp_path):
    """A finite loss whose gradients are NaN (e.g. through a 0 * inf) must not update the weights:
    ``n > clip_norm`` is False for a NaN norm, so a per-tensor clip alone would let it through."""
    t = Trainer(
        with_train_settings(
            get_preset("tiny"), {"max_steps": 5, "val_every": 1000, "checkpoint_every": 2, "val_size": 2}
        ),
        tmp_path / "run",
        progress=False,
    )
    real = t.loss

    hooked = []

    def nan_gradient(batch):
        loss = real(batch)  # finite
        if t.step == 3 and not hooked:
            weight = next(t.model.parameters())
            hooked.append(weight.register_hook(lambda g: torch.full_like(g, float("nan"))))
        return loss

    t.loss = nan_gradient
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    with pytest.raises(TrainingDivergedError, match="non-finite gradient"):
        t.train()
    assert t.step == 3
    saved = torch.load(tmp_path / "run" / "latest.pt", weights_only=True)
    assert saved["step"] == 2 and all(torch.isfinite(v).all() for v in saved["model"].values())
    assert all(torch.isfinite(v).all() for v in t.model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())  # it did train before


def test_resume_overrides_reach_the_saved_configuration(tmp_path):
    from rimlens.train import train_rim

    preset = with_train_settings(get_preset("tiny"), {"max_steps": 2, "val_every": 1000, "val_size": 2})
    train_rim(preset, tmp_path / "run", progress=False)
    with pytest.raises(RimlensInputError, match="batch_size cannot change"):
        train_rim(preset, tmp_path / "run", resume=True, settings={"max_steps": 3, "batch_size": 2}, progress=False)
    r = train_rim(
        preset, tmp_path / "run", resume=True, settings={"max_steps": 3, "learning_rate": 5e-3}, progress=False
    )
    assert r is not None and r.step == 3
    ckpt = torch.load(tmp_path / "run" / "latest.pt", weights_only=True)
    from rimlens.config import preset_from_json

    train = preset_from_json(ckpt["preset"]).train
    assert train.learning_rate == 5e-3 and train.max_steps == 3
    assert train.batch_size == get_preset("tiny").train.batch_size
