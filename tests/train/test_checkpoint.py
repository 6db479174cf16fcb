"""Resume state: random generators saved and restored, and loaded without unpickling arbitrary objects."""

from __future__ import annotations

import pytest
import torch

from conftest import train_config
from mft_pipeline.errors import MFTError
from mft_pipeline.train.checkpoint import STATE, CheckpointError, load_state, plain, restore_rng, rng_state
from mft_pipeline.train.loop import train


class WritesAFile:
    """Unpickling this runs code: it writes the file named in ``target``."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('ran')",))


def test_cpu_state_holds_no_cuda_generator_and_restores_the_same_draws():
    torch.manual_seed(3)
    state = rng_state(torch.device("cpu"))
    assert set(state) == {"torch_rng"}
    expected = torch.rand(5)
    torch.rand(7)  # move on, as training would
    restore_rng(state, torch.device("cpu"))
    assert torch.equal(torch.rand(5), expected)


def test_a_cuda_generator_state_is_ignored_on_cpu():
    torch.manual_seed(4)
    state = {**rng_state(torch.device("cpu")), "cuda_rng": torch.zeros(16, dtype=torch.uint8)}
    expected = torch.rand(3)
    restore_rng(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generator_is_saved_and_restored():
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(5)
    state = rng_state(device)
    assert set(state) == {"torch_rng", "cuda_rng"}
    expected = torch.rand(5, device=device)
    torch.rand(11, device=device)
    restore_rng(state, device)
    assert torch.equal(torch.rand(5, device=device), expected)


def test_plain_turns_numpy_values_into_python_and_tensors():
    import numpy as np

    got = plain({"a": np.float64(1.5), "b": [np.int64(2), (np.float32(0.5),)], "c": np.arange(3), "d": "x"})
    assert got["a"] == 1.5 and type(got["a"]) is float and type(got["b"][0]) is int and type(got["b"][1][0]) is float
    assert torch.equal(got["c"], torch.arange(3)) and got["d"] == "x"


@pytest.fixture(scope="module")
def finished_run(stage_two, tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoint") / "run"
    train(train_config(stage_two, out, steps=2, eval_every=1))
    return out


def test_a_saved_state_loads_with_weights_only(finished_run):
    state = torch.load(finished_run / "last" / STATE, map_location="cpu", weights_only=True)
    assert state["step"] == 2 and set(state["optimizer"]) == {"state", "param_groups"}
    assert "cuda_rng" not in state and state["torch_rng"].dtype == torch.uint8
    assert load_state(finished_run / "last")["step"] == 2


def test_a_state_file_carrying_code_is_refused_and_the_code_never_runs(stage_two, finished_run, tmp_path):
    import shutil

    run = tmp_path / "handed-over"
    shutil.copytree(finished_run, run)
    marker = tmp_path / "payload-ran"
    state = load_state(run / "last")
    torch.save({**state, "before": WritesAFile(marker)}, run / "last" / STATE)
    with pytest.raises(CheckpointError, match="refusing") as refused:
        load_state(run / "last")
    assert isinstance(refused.value, MFTError)
    with pytest.raises(CheckpointError):
        train(train_config(stage_two, run, steps=2, eval_every=1, resume=True))
    assert not marker.exists()
