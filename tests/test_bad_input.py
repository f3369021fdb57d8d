"""Every bad input is refused before any work: exit code 2, one line on stderr naming the option or
the file and what is valid, no traceback, and no file created or changed.

The table has two parts: invocations generated from the config dataclasses (each option's type,
choices and bounds, across every command), and hand-written ones for the rules between options and
for missing, empty, truncated, corrupt and wrong-kind files, and run folders that belong to another
run. A non-finite run (`--lr=1e30`) stops itself with one line and exit code 3 and never writes a
non-finite checkpoint.
"""

import dataclasses
import json
import os
import subprocess
import sys
import typing

import pytest
import torch

from minidtrpo.__main__ import COMMANDS, main

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = ["--d_model=32", "--n_layers=2", "--n_heads=2", "--batch_size=16", "--eval_n=8",
        "--device=cpu"]


def below(f, hints):
    """A value just outside the field's declared bounds (None if it has none)."""
    bounds, typ = f.metadata.get("bounds", {}), hints[f.name]
    step = 1 if typ is int else 0.5
    for op, edge in bounds.items():
        return {"ge": edge - step, "gt": edge, "le": edge + step, "lt": edge}[op]
    return None


def generated():
    """(argv, expected words) for every option of every command: wrong type, bad choice, bound."""
    cases = []
    for name, (config, _, _) in COMMANDS.items():
        hints = typing.get_type_hints(config)
        cases.append(([name, "--no_such_option=1"], "unknown option --no_such_option"))
        for f in dataclasses.fields(config):
            typ = hints[f.name]
            if typ in (int, float):
                cases.append(([name, f"--{f.name}=abc"], f"--{f.name}='abc' is not a valid"))
            if typ is bool:
                cases.append(([name, f"--{f.name}=maybe"], "is not a boolean"))
            if f.metadata.get("choices"):
                cases.append(([name, f"--{f.name}=nonsense"], "choose one of"))
            value = below(f, hints)
            if value is not None:
                cases.append(([name, f"--{f.name}={value}"], f"--{f.name}="))
        cases.append(([name, "--device=tpu"], "the devices this machine has"))
    return cases


@pytest.fixture(scope="module")
def files(tmp_path_factory, single_thread):
    """A tiny checkpoint, its pairs, an addition checkpoint, an rl run folder and damaged files."""
    root = tmp_path_factory.mktemp("files")
    main(["sft", "--task=sudoku", *TINY, "--max_steps=2", f"--out_dir={root / 'sft'}"])
    main(["sft", "--task=addition", *TINY, "--max_steps=2", f"--out_dir={root / 'add'}"])
    good = str(root / "sft" / "checkpoint.pt")
    main(["pairs", f"--init={good}", "--num_prompts=8", "--num_generations=4", "--device=cpu",
          f"--out={root / 'pairs.pt'}"])
    main(["rl", f"--init={good}", "--num_prompts=2", "--num_generations=2", "--max_iters=1",
          "--eval_n=8", "--kl_rollouts=0", "--device=cpu", f"--out_dir={root / 'rl'}"])
    data = open(good, "rb").read()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "random.pt").write_bytes(os.urandom(4096))
    (root / "empty.pt").write_bytes(b"")
    (root / "a_folder").mkdir()
    (root / "short_puzzle.txt").write_text("0430001040202001\n0430\n")
    (root / "countdown.jsonl").write_text('{"input": "30,100,93", "output": "23"}\n')
    (root / "no_output.jsonl").write_text('\n{"input": "30,100,93", "output": "23"}\n[30, 23]\n')
    (root / "gap.csv").write_text("Puzzle,Solution\n\n3102200002100320,x\n0430,x\n")
    (root / "blank.txt").write_text("\n\n")
    (root / "list.pt").write_bytes(b"")
    torch.save([1, 2, 3], root / "list.pt")
    return root


def handwritten(r):
    """(argv, expected words): rules between options, and files of every wrong kind."""
    good, pairs = f"{r}/sft/checkpoint.pt", f"{r}/pairs.pt"
    bad_files = {"missing": f"{r}/nope.pt", "truncated": f"{r}/truncated.pt",
                 "random": f"{r}/random.pt", "empty": f"{r}/empty.pt", "folder": f"{r}/a_folder",
                 "list": f"{r}/list.pt"}
    cases = [
        (["sft", "--block_size=3"], "divisor of the response length"),
        (["sft", "--steps_per_block=99"], "--steps_per_block=99"),
        (["sft", "--eval_every=0", "--steps_per_block=99"], "--steps_per_block=99"),
        (["sft", "--n_heads=3"], "--n_heads=3"),
        (["sft", "--task_options=max_blanks=99"], "max_blanks=99"),
        (["sft", "--task_options=nope=1"], "nope"),
        (["sft", "--task=addition", "--task_options=digits=x"], "digits"),
        (["sft", "--task_options=max_blanks"], "key=value"),
        (["rl", "--objective=bgpo", "--beta=0.1"], "--beta=0.1"),
        (["rl", f"--init={good}", "--steps_per_block=99", f"--out_dir={r}/x"], "0..4"),
        (["dpo", f"--init={good}", f"--pairs={pairs}", "--steps_per_block=9", f"--out_dir={r}/x"],
         "0..4"),
        (["eval", f"--ckpt={good}", "--steps_per_block=5"], "0..4"),
        (["compare", "--seeds=a"], "--seeds"), (["compare", "--seeds="], "--seeds"),
        (["compare", "--objectives=ppo"], "--objectives"),
        (["compare", "--lr_overrides=diffu_grpo=abc"], "--lr_overrides"),
        (["compare", "--lr_overrides=ppo=1e-4"], "--lr_overrides"),
        (["compare", "--rl_args=out_dir=/elsewhere"], "--rl_args"),
        (["compare", "--dpo_args=nope=1"], "unknown option --nope"),
        (["compare", "--sft_args=lr=fast"], "--lr='fast'"),
        (["compare", f"--init={r}/nope.pt", f"--out_dir={r}/c"], "no such file"),
        (["sft", "--resume", f"--out_dir={r}/empty_run"], "no such file"),
        (["rl", f"--init={good}", "--resume", f"--out_dir={r}/sft"], "holds another run"),
        (["dpo", f"--init={good}", f"--pairs={pairs}", "--resume", f"--out_dir={r}/rl"],
         "holds another run"),
        (["rl", f"--init={r}/add/checkpoint.pt", "--resume", f"--out_dir={r}/rl"],
         "holds another run"),
        (["dpo", f"--init={r}/add/checkpoint.pt", f"--pairs={pairs}", f"--out_dir={r}/x"],
         "pairs"),
        (["dpo", f"--init={good}", f"--pairs={good}", f"--out_dir={r}/x"], "a checkpoint"),
        (["eval", f"--ckpt={pairs}"], "a pairs file"),
        (["eval", "--ckpt="], "an empty path"),
        (["eval", f"--ckpt={good}", f"--problems={r}/short_puzzle.txt"], "line 2: '0430'"),
        (["eval", f"--ckpt={good}", f"--problems={r}/countdown.jsonl"], "'30,100,93:23'"),
        (["eval", f"--ckpt={good}", f"--problems={r}/no_output.jsonl"],
         "line 3: '[30, 23]' is not a JSON object with 'input' and 'output'"),
        (["eval", f"--ckpt={good}", f"--problems={r}/gap.csv"], "line 4: '0430'"),
        (["eval", f"--ckpt={good}", f"--problems={r}/blank.txt"], "no problems"),
        (["eval", f"--ckpt={good}", f"--problems={r}/nope.txt"], "nope.txt"),
        (["eval", f"--ckpt={good}", f"--problems={r}/a_folder"], "a_folder"),
        (["sft", f"--init={r}/add/checkpoint.pt", f"--out_dir={r}/x"], "--init="),
        (["sft", "--out_dir="], "--out_dir"),
        (["sft", f"--out_dir={good}"], "not an existing file"),
        (["pairs", f"--init={good}", f"--out={r}/a_folder"], "not an existing folder"),
        (["pairs", f"--init={good}", f"--out={good}/x.pt"], "not one"),
        (["dpo", "--epochs=inf"], "a finite number"), (["sft", "--lr=nan"], "a finite number"),
        (["sft", "--seed=-1"], "--seed=-1"), (["sft", "--seed=18446744073709551615"], "--seed"),
        (["rl", "--temperature=0"], "--temperature=0.0"), (["sft", "--seed"], "--seed"),
        (["compare", "--rl_args=beta=0.1", "--objectives=bgpo"], "--beta=0.1"),
        (["compare", "--objectives="], "--objectives"),
    ]
    for kind, path in bad_files.items():
        cases += [(["eval", f"--ckpt={path}"], path), (["estimators", f"--ckpt={path}"], path),
                  (["rl", f"--init={path}", f"--out_dir={r}/x"], path),
                  (["pairs", f"--init={path}", f"--out={r}/x.pt"], path),
                  (["dpo", f"--init={path}", f"--pairs={pairs}", f"--out_dir={r}/x"], path),
                  (["dpo", f"--init={good}", f"--pairs={path}", f"--out_dir={r}/x"], path),
                  (["sft", f"--init={path}", f"--out_dir={r}/x"], path)]
    return cases


def tree(root):
    """Every file below root with its size and modification time."""
    return {os.path.join(d, n): (os.stat(os.path.join(d, n)).st_size,
                                 os.stat(os.path.join(d, n)).st_mtime_ns)
            for d, _, names in os.walk(root) for n in names}


def test_at_least_100_bad_invocations_each_one_line_exit_2_nothing_written(files, tmp_path,
                                                                            monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # default output folders (runs/...) would land here
    cases = generated() + handwritten(files)
    assert len(cases) >= 100
    before, failures = (tree(files), tree(tmp_path)), []
    for argv, words in cases:
        capsys.readouterr()
        try:
            main(argv)
            failures.append(f"{argv}: ran")
            continue
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        if code != 2 or len(err) != 1 or not err[0].startswith("error: ") or words not in err[0]:
            failures.append(f"{argv}: exit {code}, stderr {err}")
    assert not failures, "\n".join(failures)
    assert (tree(files), tree(tmp_path)) == before  # no file created, changed or removed


def test_non_finite_training_stops_with_one_line_and_keeps_the_last_finite_checkpoint(files,
                                                                                      tmp_path,
                                                                                      capsys):
    good = f"{files}/sft/checkpoint.pt"
    out = tmp_path / "rl"
    with pytest.raises(SystemExit) as e:
        main(["rl", f"--init={good}", "--lr=1e30", "--num_prompts=4", "--num_generations=4",
              "--eval_n=8", "--kl_rollouts=0", "--max_iters=40", "--device=cpu",
              f"--out_dir={out}"])
    assert e.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    iters = [r for r in rows if "test_exact" not in r]
    assert all(r["skipped_steps"] >= 1 for r in iters[-10:])  # ten in a row, each one undone
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["iter"] == 0  # the start, the last finite state saved
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_a_live_run_holds_its_folder(tmp_path):
    """A second run in a folder whose lock a live process holds is refused; once that process is
    gone (here: killed) the kernel has released the lock and a run may start there."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / "lock")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(SystemExit) as e:
        main(["sft", *TINY, "--max_steps=1", f"--out_dir={out}"])
    assert e.value.code == 2 and not (out / "checkpoint.pt").exists()
    holder.kill()
    holder.wait()
    main(["sft", *TINY, "--max_steps=1", f"--out_dir={out}"])
    assert (out / "checkpoint.pt").exists()


HOLD_LOCK = """
import fcntl, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.write("12345"); f.flush()
print("locked", flush=True)
time.sleep(60)
"""


def test_resume_refuses_other_options(files, tmp_path, capsys):
    """--resume with an objective other than the saved run's is another run: one line, exit 2."""
    good = f"{files}/sft/checkpoint.pt"
    argv = ["rl", f"--init={good}", "--num_prompts=2", "--num_generations=2", "--max_iters=1",
            "--eval_n=8", "--kl_rollouts=0", "--device=cpu", f"--out_dir={tmp_path}"]
    main(argv)
    before = tree(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*argv, "--objective=bgpo", "--max_iters=2", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "objective='full_trajectory' there" in err[0]
    assert tree(tmp_path) == before
