"""Stage two on 2 CPU processes (gloo): DDP and FSDP2 give one process's result, and resume at any world size.

Every run here trains the same 4 steps (micro-batch 4 x 2 accumulation, a quarter replay, so one
micro-batch mixes both caches) and is compared with one uninterrupted single-process run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from conftest import metric_rows, stop_after_checkpoint, train_config
from mft_pipeline.config import TrainConfig
from mft_pipeline.train.checkpoint import save_pretrained
from mft_pipeline.train.loop import micro_batches, train

REPO = Path(__file__).resolve().parents[2]
SETTINGS = dict(
    steps=4, eval_every=2, batch_size=4, grad_accum=2, replay_fraction=0.25, schedule="cosine", warmup_steps=1,
    # 5 general-domain rows in batches of 2: the ranks' shares (3 and 2 rows) need 2 and 1 forwards, so
    # evaluation must pad to keep FSDP's collectives in step.
    general_max_sequences=5, eval_batch_size=2,
)  # fmt: skip


def settings(d, out, **kw) -> TrainConfig:
    return train_config(d, out, replay=str(d / "general-cache"), **{**SETTINGS, **kw})


def cli_args(config: TrainConfig) -> list[str]:
    """`mft train` flags for ``config`` (the non-default fields only)."""
    args = []
    for name, value in vars(config).items():
        if value == TrainConfig.__dataclass_fields__[name].default:
            continue
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def torchrun(config: TrainConfig, nproc: int = 2) -> None:
    """The documented command: torchrun --standalone --nproc-per-node N -m cli.main train ..."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "cli.main", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd + cli_args(config), cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, world: int, *args, timeout: float = 180) -> None:
    """``worker(rank, world, port, *args)`` in ``world`` fresh processes; a hang fails the test instead of blocking it."""
    processes = mp.spawn(worker, args=(world, free_port(), *args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not processes.join(timeout=1):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail(f"{worker.__name__} did not finish in {timeout} s")


def _fsdp_worker(rank: int, world: int, port: int, tied: Path, config: TrainConfig, kill_at: int) -> None:
    """One rank: save the tied-embedding model in ``tied`` sharded by FSDP2, then run ``config`` and die
    right after writing the checkpoint of step ``kill_at``, as a kill would."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from mft_pipeline.train import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # A group this process started is the one training uses too.
    dist.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(tied / "unsharded")
    sharded = distributed.wrap(model, distributed.Ranks("fsdp", rank, world, torch.device("cpu")))
    save_pretrained(sharded, AutoTokenizer.from_pretrained(tied / "unsharded"), tied / "sharded")
    train(config, on_checkpoint=stop_after_checkpoint(kill_at, exit_code=3))


@pytest.fixture(scope="module")
def reference(stage_two, tmp_path_factory):
    """One process, never interrupted: what every distributed or resumed run must reproduce."""
    out = tmp_path_factory.mktemp("dist") / "one-process"
    train(settings(stage_two, out))
    return out


def assert_same_run(run: Path, reference: Path, checkpoint: str = "last") -> None:
    """Same weights (float tolerance), and the same logged losses, token counts, gradient norms and perplexities.

    The gradient norm is logged before clipping: it catches a wrong scale of the gradients, to which
    AdamW's weights are almost blind.
    """
    ref, got = metric_rows(reference, "train"), metric_rows(run, "train")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3, 4]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in ref], rel=1e-5), key
    for kind in ("before", "eval"):
        for r, g in zip(metric_rows(reference, kind), metric_rows(run, kind), strict=True):
            assert g["step"] == r["step"]
            assert g["ppl_spec"] == pytest.approx(r["ppl_spec"], rel=1e-5)
            assert g["ppl_gen"] == pytest.approx(r["ppl_gen"], rel=1e-5)
    a = AutoModelForCausalLM.from_pretrained(reference / checkpoint).state_dict()
    b = AutoModelForCausalLM.from_pretrained(run / checkpoint).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        # Adam turns the rounding of a near-zero gradient (summed in another order) into up to ~1e-4 here.
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=2e-4)


def test_ranks_split_each_micro_batch_into_contiguous_parts():
    special, replay = np.arange(6), np.arange(100, 102)
    one = list(micro_batches(special, replay, 4))
    two = [list(micro_batches(special, replay, 4, rank, 2)) for rank in (0, 1)]
    for i, (s, r) in enumerate(one):
        assert list(s) + list(r) == [x for rank in (0, 1) for part in two[rank][i] for x in part]
    assert [(list(s), list(r)) for s, r in two[1]] == [([2, 3], []), ([], [100, 101])]


def test_torchrun_ddp_matches_one_process(stage_two, reference, tmp_path):
    # 2 ranks x micro-batch 2 (--batch-size 4 is the global micro-batch) against 1 rank x micro-batch 4.
    torchrun(settings(stage_two, tmp_path / "ddp"))
    assert_same_run(tmp_path / "ddp", reference)
    assert_same_run(tmp_path / "ddp", reference, checkpoint="best")
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["config"]["distributed"] == "auto"


def test_torchrun_ddp_trains_a_lora_adapter_like_one_process(stage_two, tmp_path):
    from safetensors.torch import load_file

    kw = dict(steps=2, eval_every=2, peft="lora", merge_adapter=True, general_eval=None)
    train(train_config(stage_two, tmp_path / "one", **kw))
    torchrun(train_config(stage_two, tmp_path / "ddp", **kw))
    ref, got = metric_rows(tmp_path / "one", "train"), metric_rows(tmp_path / "ddp", "train")
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in ref], rel=1e-5)
    a = load_file(tmp_path / "one" / "last" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ddp" / "last" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "best-merged")


def test_fsdp_checkpoints_and_a_killed_run_resumes_in_one_process(stage_two, reference, tiny_tokenizer, tmp_path):
    from safetensors.torch import load_file

    from conftest import make_model

    tied = make_model(len(tiny_tokenizer))
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    tied.save_pretrained(tmp_path / "tied" / "unsharded")
    tiny_tokenizer.save_pretrained(tmp_path / "tied" / "unsharded")
    config = settings(stage_two, tmp_path / "run", distributed="fsdp")
    with pytest.raises(mp.ProcessExitedException) as died:
        spawn(_fsdp_worker, 2, tmp_path / "tied", config, 2)
    assert died.value.exit_code == 3, "the workers must die where the test kills them, not earlier"

    # Gathered from shards, a tied embedding is stored once and stays tied, exactly as without FSDP.
    sharded, unsharded = tmp_path / "tied" / "sharded", tmp_path / "tied" / "unsharded"
    assert load_file(sharded / "model.safetensors").keys() == load_file(unsharded / "model.safetensors").keys()
    loaded = AutoModelForCausalLM.from_pretrained(sharded)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    expected = AutoModelForCausalLM.from_pretrained(unsharded).state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)

    # The killed run's gathered checkpoint is a plain from_pretrained folder...
    assert json.loads((tmp_path / "run" / "last" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert [r["step"] for r in metric_rows(tmp_path / "run", "train")] == [1, 2]
    # ...and one process, without torchrun, finishes it on the same trajectory.
    train(settings(stage_two, tmp_path / "run", resume=True))
    assert_same_run(tmp_path / "run", reference)


def test_one_process_run_resumes_under_torchrun_fsdp(stage_two, reference, tmp_path, kill_and_resume):
    kill_and_resume.kill(settings(stage_two, tmp_path / "run"), at=2)
    torchrun(settings(stage_two, tmp_path / "run", distributed="fsdp", resume=True))
    assert_same_run(tmp_path / "run", reference)
    assert_same_run(tmp_path / "run", reference, checkpoint="best")


def test_refusals(stage_two, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="fsdp does not shard --peft"):
        settings(stage_two, tmp_path / "r", distributed="fsdp", peft="lora")
    with pytest.raises(ValueError, match="torchrun"):
        train(settings(stage_two, tmp_path / "r", distributed="ddp"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="2 separate copies"):
        train(settings(stage_two, tmp_path / "r", distributed="none"))
    with pytest.raises(ValueError, match="does not split evenly over 2"):
        train(settings(stage_two, tmp_path / "r", batch_size=3))
    assert not (tmp_path / "r").exists()
