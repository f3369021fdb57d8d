"""Smoke runs of the command line: SFT, eval, determinism, resume, and clear errors for bad
input."""

import json
import os

import pytest
import torch

from minidtrpo.__main__ import main
from minidtrpo.train import load

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--task=sudoku", "--d_model=32", "--n_layers=2", "--n_heads=2", "--batch_size=16",
        "--eval_n=16"]


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for r in rows:  # wall-clock fields differ from run to run; everything else must not
        for key in ("train_seconds", "tokens_per_s", "update_s"):
            r.pop(key, None)
    return rows


def test_sft_smoke_and_eval(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    main(["sft", *TINY, "--max_steps=20", "--eval_every=10", f"--out_dir={out}"])
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "curves.png"):
        assert os.path.exists(os.path.join(out, name)), name
    rows = read_metrics(out)
    assert sum("loss" in r for r in rows) == 20 and sum("test_exact" in r for r in rows) == 2
    assert json.load(open(os.path.join(out, "config.json")))["max_steps"] == 20
    model, task = load(os.path.join(out, "checkpoint.pt"))
    assert task.name == "sudoku" and model.config.d_model == 32
    capsys.readouterr()
    main(["eval", f"--ckpt={out}/checkpoint.pt", "--n=8", "--device=cpu"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert set(result) == {"exact", "reward", "n"} and result["n"] == 8
    # eval takes the decoding rules and hands them to the sampler
    import minidtrpo.train as train
    seen, generate = [], train.generate
    monkeypatch.setattr(train, "generate", lambda *a, **kw: seen.append(kw) or generate(*a, **kw))
    main(["eval", f"--ckpt={out}/checkpoint.pt", "--n=8", "--device=cpu", "--remasking=threshold",
          "--threshold=0.5", "--eos_factor=0.2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 8
    assert seen and all(kw["remasking"] == "threshold" and kw["threshold"] == 0.5
                        and kw["eos_factor"] == 0.2 for kw in seen)


def test_eval_scores_the_problems_of_a_file(tmp_path, capsys):
    """--problems: one problem per line, d1's sudoku CSV (also with a byte-order mark, CRLF line
    ends and a blank line) or d1's countdown JSONL: each file gives its problems in order, scored
    as evaluate scores them (test_tasks checks the scores of puzzles with several solutions)."""
    from minidtrpo.__main__ import read_problems
    from minidtrpo.train import evaluate
    sudoku, countdown = str(tmp_path / "sudoku"), str(tmp_path / "countdown")
    main(["sft", *TINY, "--max_steps=2", "--eval_every=0", f"--out_dir={sudoku}"])
    main(["sft", *TINY[1:], "--task=countdown", "--max_steps=2", "--eval_every=0",
          f"--out_dir={countdown}"])
    puzzles = ["3102200002100320", "0000000000000000", "0430001040202001"]  # the 2nd: 288 grids
    files = {"lines.txt": ("\n".join(puzzles) + "\n", sudoku, puzzles),
             "d1.csv": ("Puzzle,Solution\n" + "".join(f"{p},1234341221434321\n" for p in puzzles),
                        sudoku, puzzles),
             "bom_crlf.csv": ("\ufeffPuzzle,Solution\r\n\r\n" + "".join(
                 f"{p},1234341221434321\r\n" for p in puzzles), sudoku, puzzles),
             "cd3.jsonl": ('{"input": "30,100,93", "output": "23"}\n'
                           '{"input": "83,18,75", "output": "10"}\n', countdown,
                           ["30,100,93:23", "83,18,75:10"])}
    for name, (text, run, problems) in files.items():
        (tmp_path / name).write_bytes(text.encode())
        model, task = load(f"{run}/checkpoint.pt")
        prompts = read_problems(str(tmp_path / name), task)
        assert [task.decode_problem(p) for p in prompts] == problems
        capsys.readouterr()
        main(["eval", f"--ckpt={run}/checkpoint.pt", f"--problems={tmp_path / name}",
              "--device=cpu"])
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["n"] == len(problems) and result == evaluate(model, task, prompts), name


def test_same_seed_same_metrics(tmp_path):
    runs = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        main(["sft", *TINY, "--max_steps=6", "--eval_every=3", "--seed=3", f"--out_dir={out}"])
        runs.append(read_metrics(out))
    assert runs[0] == runs[1]
    out = str(tmp_path / "c")
    main(["sft", *TINY, "--max_steps=6", "--eval_every=3", "--seed=4", f"--out_dir={out}"])
    assert read_metrics(out) != runs[0]


def test_resume_continues_exactly(tmp_path):
    """An SFT run stopped at step 4 and resumed to step 8 logs what an uninterrupted run logs."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    main(["sft", *TINY, "--max_steps=8", "--eval_every=4", f"--out_dir={full}"])
    main(["sft", *TINY, "--max_steps=4", "--eval_every=4", f"--out_dir={part}"])
    main(["sft", *TINY, "--max_steps=8", "--eval_every=4", f"--out_dir={part}", "--resume"])
    a, b = read_metrics(full), read_metrics(part)
    assert a == b  # every row, the evaluation at step 4 included, once
    for x, y in zip(torch.load(f"{full}/checkpoint.pt", weights_only=True)["model"].values(),
                    torch.load(f"{part}/checkpoint.pt", weights_only=True)["model"].values()):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("argv, message", [
    (["sft", "--nope=1"], "unknown option --nope"),
    (["sft", "--task=chess"], "choose one of addition"),
    (["sft", "--lr=fast"], "--lr='fast' is not a valid float"),
    (["sft", "--layout=causal"], "choose one of block, full"),
    (["train"], "valid commands"),
    (["eval", "--split=dev"], "choose one of train, test"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_run_saved_with_other_options_is_refused_in_one_line(tmp_path, capsys):
    """A checkpoint saved by another version of minidtrpo (an option it lacks, or one that no
    longer exists) is refused with one line naming the options, not migrated."""
    out = str(tmp_path / "run")
    main(["sft", *TINY, "--max_steps=4", "--eval_every=4", f"--out_dir={out}"])
    path = os.path.join(out, "checkpoint.pt")
    state = torch.load(path, weights_only=True)
    for config in ({k: v for k, v in state["config"].items() if k != "t_min"},  # predates t_min
                   {**state["config"], "old_option": 1}):  # an option since removed
        torch.save({**state, "config": config}, path)
        with pytest.raises(SystemExit) as e:
            main(["sft", *TINY, "--max_steps=6", f"--out_dir={out}", "--resume"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1
        assert "saved by another version of minidtrpo" in err
        assert "t_min" in err or "old_option" in err
    torch.save(state, path)  # as saved: it resumes
    main(["sft", *TINY, "--max_steps=6", "--eval_every=4", f"--out_dir={out}", "--resume"])
    assert sum("loss" in r for r in read_metrics(out)) == 6


def test_a_task_recipe_fills_only_the_options_the_command_line_leaves():
    from minidtrpo.config import parse
    from minidtrpo.sft import SFTConfig

    def recipe(argv):
        c = parse(SFTConfig, argv, "sft")
        return c.n_layers, c.batch_size, c.min_lr_ratio, c.block_size

    assert recipe(["--task=star"]) == (2, 32, 1.0, 4)  # Star.sft_recipe
    assert recipe(["--task=sudoku"]) == (4, 128, 0.1, 4)  # SFTConfig's own defaults
    assert recipe(["--task=addition"]) == (4, 128, 0.1, 1)  # the task's decoding block
    # each task's recipe is a count of steps; a given count wins
    steps = {t: parse(SFTConfig, [f"--task={t}"], "sft").max_steps
             for t in ("addition", "countdown", "star", "sudoku")}
    assert steps == {"addition": 1000, "countdown": 6500, "star": 5000, "sudoku": 300}
    assert parse(SFTConfig, ["--task=addition", "--max_steps=7"], "sft").max_steps == 7
    # given values win, the defaults' own values included
    assert recipe(["--task=star", "--n_layers=4", "--batch_size=128", "--min_lr_ratio=0.1"]) \
        == (4, 128, 0.1, 4)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        SFTConfig(min_lr_ratio=-0.5)


def test_the_schedule_follows_the_step_count_and_a_time_budget_only_stops(tmp_path):
    """The same command with a time budget that stops it early logs the same learning rates, step
    for step, as without one: the cosine runs over max_steps, not over the seconds."""
    full, capped = str(tmp_path / "full"), str(tmp_path / "capped")
    options = [*TINY, "--max_steps=30", "--warmup_steps=2", "--eval_every=0"]
    main(["sft", *options, f"--out_dir={full}"])
    main(["sft", *options, "--time_budget=0.05", f"--out_dir={capped}"])
    lrs = {name: [r["lr"] for r in read_metrics(out) if "lr" in r]
           for name, out in (("full", full), ("capped", capped))}
    assert 0 < len(lrs["capped"]) < len(lrs["full"]) == 30  # the budget stopped it
    assert lrs["capped"] == lrs["full"][:len(lrs["capped"])]
