"""Data parallel on the CPU (DDP, gloo, 2 processes): one update on 2 processes equals the update on
1 at the same global batch (sft and dpo through torchrun, the rl objectives given the same
rollouts); BGPO's n_mc backwards reduce gradients once; a 2-process run killed and resumed writes
the metrics of an uninterrupted one; bad launches are refused with one line; a finished run
waits for the other processes before it leaves."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from einops import rearrange, repeat
from fixtures import random_prompts, tiny_model
from test_interrupt import SFT, untimed

from minidtrpo.__main__ import main
from minidtrpo.config import BadInput
from minidtrpo.folders import FolderLock
from minidtrpo.objectives import grpo_advantages
from minidtrpo.sampling import generate

pytestmark = pytest.mark.usefixtures("single_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "minidtrpo"]


def torchrun(argv, **kw):
    return subprocess.run([*TORCHRUN, *argv], env=ENV, capture_output=True, text=True,
                          timeout=300, **kw)


@pytest.fixture(scope="module")
def start(tmp_path_factory, single_thread):
    """A tiny block-layout sudoku checkpoint, and 7 of the pairs it samples: an epoch's last
    batch is short (4 pairs per step: 3, split 2 + 1; 2 per step: 1, split 1 + 0)."""
    root = tmp_path_factory.mktemp("start")
    main([*SFT, "--max_steps=4", f"--out_dir={root / 'sft'}"])
    ckpt = str(root / "sft" / "checkpoint.pt")
    main(["pairs", f"--init={ckpt}", "--num_prompts=32", "--num_generations=4", "--device=cpu",
          f"--out={root / 'all_pairs.pt'}"])
    data = torch.load(root / "all_pairs.pt", weights_only=True)
    for side in ("chosen", "rejected"):
        data[side] = {k: v[:7] if torch.is_tensor(v) else v for k, v in data[side].items()}
    torch.save(data, root / "pairs.pt")
    return ckpt, str(root / "pairs.pt")


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "checkpoint.pt"), weights_only=True)["model"]


def assert_same_weights(a, b):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------------
# One update on 2 processes = one update on 1


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_two_processes_take_the_one_process_step(kind, start, tmp_path):
    """sft: every process draws the whole batch and its noise, each trains on half the rows.
    dpo, exact trajectory (no draws): a batch of 4 pairs split 2 + 2, then one of 3 split 2 + 1,
    the shares weighted 2/3 and 1/3."""
    ckpt, pairs = start
    argv = ([*SFT, "--max_steps=2", "--eval_every=0"] if kind == "sft" else
            ["dpo", f"--init={ckpt}", f"--pairs={pairs}", "--estimator=full_trajectory",
             "--batch_size=4", "--max_iters=2", "--eval_n=8", "--eval_every=0", "--device=cpu"])
    main([*argv, f"--out_dir={tmp_path / 'one'}"])
    done = torchrun([*argv, f"--out_dir={tmp_path / 'two'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))


G = 2  # responses per prompt in the rl update tests
# 4 prompts: on 2 processes the first holds groups 0 and 1 (4 responses kept), the second groups
# 2 (equal rewards: dropped) and 3 (2 kept), so the shares of the loss's rows are 4/6 and 2/6
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 1.0])


def rl_update(rank, world, objective, out):
    """One update of `objective` on this process's share of a fixed global batch of rollouts, as
    rl.train_rl's iteration does it; saves the weights after the step and the all-reduces counted
    during the update."""
    import torch.distributed as dist

    from minidtrpo import rl, updates
    from minidtrpo.elbo import elbo_masks_for
    from minidtrpo.parallel import (all_ranks, data_parallel, end_parallel, init_parallel,
                                    share, weigh)

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        init_parallel("cpu")
    cfg = rl.RLConfig(objective=objective, num_prompts=4, num_generations=G, n_mc=3)
    policy, ref = tiny_model(dtype=torch.float32), tiny_model(dtype=torch.float32)
    prompts = repeat(random_prompts(4), "p l -> (p g) l", g=G)  # (B, P) the global batch
    traj = generate(policy, prompts, temperature=1.0, generator=torch.Generator().manual_seed(0))
    # the ELBO masks of the global batch, drawn once: each process gets its rows' masks
    masks = elbo_masks_for(cfg.elbo_masks, "block", traj, cfg.n_mc,
                           torch.Generator().manual_seed(1))  # (B, N, L)
    rows = share(cfg.num_prompts, rank, world, "num_prompts", group=G)
    traj, rewards = traj.index(torch.arange(len(prompts))[rows]), REWARDS[rows]
    adv, _ = grpo_advantages(rewards, G)
    keep = repeat(rearrange(adv, "(p g) -> p g", g=G).ne(0).any(1), "p -> (p g)", g=G)
    kept = all_ranks(keep.sum().item())
    fwd = data_parallel(policy, world)
    weigh(fwd, keep.sum().item(), kept)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    reduces, all_reduce, draw = [], dist.all_reduce, updates.elbo_masks_for
    dist.all_reduce = lambda *a, **k: reduces.append(1) or all_reduce(*a, **k)  # count them
    updates.elbo_masks_for = lambda *args: masks[rows][keep]  # the same draws on 1 and 2 processes
    try:
        updates.UPDATES[objective](cfg, fwd, ref, traj.index(keep), adv[keep], None, opt.step)
    finally:
        dist.all_reduce, updates.elbo_masks_for = all_reduce, draw
    if rank == 0:
        torch.save({"model": policy.state_dict(), "reduces": len(reduces)}, out)
    end_parallel(finished=True)


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.parametrize("objective", ["full_trajectory", "bgpo"])
def test_two_processes_take_the_one_process_rl_update(objective, tmp_path):
    """Given the same rollouts (and ELBO masks), the update on 2 processes, each with whole
    groups and its own count of kept responses, equals the update on 1; BGPO's n_mc = 3 backwards
    reduce the gradients once (one bucket: the model is tiny)."""
    rl_update(0, 1, objective, tmp_path / "one.pt")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    mp.spawn(rl_update, args=(2, objective, tmp_path / "two.pt"), nprocs=2)
    one, two = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("one", "two"))
    assert_same_weights(one["model"], two["model"])
    assert two["reduces"] == 1, f"{two['reduces']} all-reduces in one update"


# --------------------------------------------------------------------------------------------------
# Resume, and bad launches


def command(kind, start):
    ckpt, pairs = start
    if kind == "sft":
        return [*SFT, "--max_steps=40"]
    if kind == "rl":
        return ["rl", f"--init={ckpt}", "--objective=bgpo", "--num_prompts=4",
                "--num_generations=4", "--n_mc=2", "--eval_n=8", "--eval_every=3",
                "--kl_rollouts=4", "--max_iters=12", "--device=cpu"]
    return ["dpo", f"--init={ckpt}", f"--pairs={pairs}", "--estimator=dtrpo", "--batch_size=2",
            "--eval_n=8", "--eval_every=5", "--epochs=100", "--max_iters=30", "--device=cpu"]


@pytest.mark.parametrize("kind", ["sft", "rl", "dpo"])
def test_two_processes_killed_and_resumed_write_the_same_metrics(kind, start, tmp_path):
    """Rank 0 killed (SIGKILL) once a checkpoint is saved and the log holds 10 rows; torchrun
    then ends rank 1. Resumed
    with --resume on 2 processes, the log is the uninterrupted run's (timing fields aside).
    dpo: every fourth batch is 1 pair, so the second process joins the backward with weight 0."""
    argv = command(kind, start)
    done = torchrun([*argv, f"--out_dir={tmp_path / 'straight'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "killed"
    launch = subprocess.Popen([*TORCHRUN, *argv, f"--out_dir={out}"], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = out / "metrics.jsonl", time.time() + 120
    while launch.poll() is None and time.time() < deadline:
        if (out / "checkpoint.pt").exists() and sum(1 for _ in open(log)) >= 10:
            os.kill(int(open(out / "lock").read()), signal.SIGKILL)  # the lock holds rank 0's pid
            break
        time.sleep(0.005)
    assert launch.wait(timeout=120) != 0, "it ended before the kill"
    assert len(untimed(out)) < len(untimed(tmp_path / "straight"))
    done = torchrun([*argv, f"--out_dir={out}", "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert untimed(out) == untimed(tmp_path / "straight")


@pytest.mark.parametrize("argv, says", [
    (["sft", "--batch_size=33"], "--batch_size=33 does not divide among the 2 processes"),
    (["rl", "--num_prompts=3", "--num_generations=2"],
     "--num_prompts=3 does not divide among the 2 processes (its groups of 2 rows stay whole"),
    (["sft"], "is in use by a live run")])
def test_bad_launches_are_refused_with_one_line(argv, says, start, tmp_path):
    argv = [*argv, f"--init={start[0]}"] if argv[0] == "rl" else [*SFT, *argv[1:]]
    out = tmp_path / "run"
    os.makedirs(out)
    with FolderLock(out):  # a live run in the folder (refused only by the last launch)
        done = torchrun([*argv, "--max_steps=1", f"--out_dir={out}"] if argv[0] == "sft" else
                        [*argv, "--max_iters=1", f"--out_dir={out}"])
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0], done.stderr[-3000:]


@pytest.mark.parametrize("outcome, calls", [
    ("finished", ["barrier", "destroy"]), ("interrupted", ["destroy"]), ("refused", ["destroy"])])
def test_only_a_finished_run_waits_for_the_others_before_leaving(outcome, calls, monkeypatch):
    """A finished run waits at a barrier before leaving the process group (an early leaver may
    abort at shutdown while gloo's threads still free its last tensors); an interrupted or refused
    one leaves at once, as the others may never arrive."""
    import minidtrpo.__main__ as entry
    import torch.distributed as dist

    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: seen.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: seen.append("destroy"))

    def command(cfg):
        if outcome == "interrupted":
            raise KeyboardInterrupt
        if outcome == "refused":
            raise BadInput("--n=0 is bad")

    config = entry.COMMANDS["eval"][0]
    monkeypatch.setitem(entry.COMMANDS, "eval", (config, command, ""))
    if outcome == "finished":
        main(["eval"])
    else:
        with pytest.raises(SystemExit):
            main(["eval"])
    assert seen == calls
