"""Head-to-head: every objective from one SFT start, with the same seeds, each at its recipe's counts.

The experiment the dTRPO (arXiv 2603.18806) and BGPO (arXiv 2510.11683) papers report at 7-8B
scale, at toy scale: the online objectives of rl.py (full_trajectory, bgpo, diffu_grpo, vrpo_ol;
dtrpo on request) and the three DPO estimators of preference.py (dpo_dtrpo, dpo_full_trajectory,
dpo_vrpo),
each run for its command's count (rl's iterations, dpo's epochs over the pairs; `rl_args` and
`dpo_args` change them) per seed, `budget` seconds of training (rollouts + updates; evaluation and
pair sampling excluded) an optional cap. Writes compare.md (a table, also printed) and compare.png (test exact accuracy
against training seconds and iterations: mean over seeds, min–max band).

Choices:
1. Every score is the FINAL checkpoint's, never the best one seen (that would overfit the test set).
2. Each run is a subprocess by default, so its peak RSS is its own; `subprocess=false` runs
   in-process (faster to start, for tests; RSS is then the whole process's).
3. The SFT start (out_dir/sft) and each seed's pairs (out_dir/pairs_seed<s>.pt) are made once and
   reused; a finished run of the same config is reused, an unfinished one resumed: rerunning the
   command after an interruption continues it. A finished run made by `rl` or `dpo` directly, in
   compare's folder layout (out_dir/<objective>/seed<s>), is reused too when only its evaluation
   cadence or a stopping limit it did not reach differs (`reusable`).
"""

import math
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass

from .config import (Config, RunStopped, arg, check, device_arg, folder_problem, parse,
                     parse_options, read_saved)
from .model import LAYOUTS
from .preference import DPOConfig, PairsConfig, make_pairs, train_dpo
from .rl import OBJECTIVES, RLConfig, train_rl
from .tasks import TASKS
from .folders import CHECKPOINT, read_metrics, same_options
from .sft import SFTConfig, train_sft
from .train import load

DPO = ("dpo_dtrpo", "dpo_full_trajectory", "dpo_vrpo")
SET_BY_COMPARE = {"out_dir", "out", "init", "pairs", "seed", "time_budget", "device", "resume",
                  "objective", "estimator", "task", "task_options", "layout"}
ALL = OBJECTIVES + DPO
RUNS = "options of the runs"  # the --help group of what compare passes on to sft, rl, pairs, dpo


@dataclass
class CompareConfig(Config):
    """Run every objective from the same start and seeds; write a table and figures."""
    task: str = arg("sudoku", "task", TASKS)
    layout: str = arg("block", "attention layout of the SFT start", LAYOUTS)
    init: str = arg("", "start from this checkpoint instead of training one")
    objectives: str = arg(",".join(o for o in ALL if o != "dtrpo"),  # dtrpo online: by request
                          f"comma-separated subset of {', '.join(ALL)}")
    seeds: str = arg("0,1", "comma-separated seeds; each objective runs once per seed")
    budget: float = arg(0.0, "also stop a run after this many training seconds (rollout + update; "
                             "evaluation excluded; 0: no cap, its count ends it)", ge=0)
    device: str = device_arg()
    out_dir: str = arg("runs/compare", "folder of the runs, compare.md and compare.png",
                       valid=folder_problem)
    # key=value options: task_options and *_args pass options through to another command (a task,
    # sft, rl, dpo, pairs), whose own parser checks them; lr_overrides maps objectives to rates.
    # -- the SFT start
    task_options: str = arg("", "task options, key=value,...", group=RUNS)
    sft_budget: float = arg(0.0, "cap on the start's SFT seconds (0: none, the task's recipe of "
                                 "steps ends it; a finished start is reused)", ge=0, group=RUNS)
    sft_args: str = arg("", "more sft options, e.g. d_model=64", group=RUNS)
    # -- the runs of the objectives
    lr_overrides: str = arg(
        "vrpo_ol=2e-4,diffu_grpo=1e-5,dpo_full_trajectory=1e-5,dpo_vrpo=1e-5",
        "per-objective learning rates, name=lr,...; the others keep their command's default "
        "(rl 1e-4, dpo 3e-5): the rates each objective was tuned at", group=RUNS)
    rl_args: str = arg("", "more rl options for the online runs, e.g. num_prompts=8", group=RUNS)
    dpo_args: str = arg("", "more dpo options, e.g. beta=0.1", group=RUNS)
    pairs_args: str = arg("", "more pairs options (DPO's pairs), e.g. num_prompts=256", group=RUNS)
    # -- evaluation and diagnostics
    eval_every_s: float = arg(30.0, "evaluate every this many training seconds (and at the start "
                              "and end)", ge=0, group="evaluation")
    eval_n: int = arg(500, "fixed test problems per evaluation", ge=1, group="evaluation")
    subprocess: bool = arg(True, "one subprocess per run (clean peak memory); false: in-process",
                           group="diagnostics")

    def __post_init__(self):
        super().__post_init__()
        check(all(n in ALL for n in self.objectives.split(",")), "objectives", self.objectives,
              f"a comma-separated subset of {', '.join(ALL)}")
        check(all(s.strip().isdigit() for s in self.seeds.split(",")), "seeds", self.seeds,
              "comma-separated ints >= 0")
        try:
            lrs = parse_options(self.lr_overrides)
        except ValueError:
            lrs = {"": None}
        check(all(k in ALL and isinstance(v, (int, float)) and v > 0 for k, v in lrs.items()),
              "lr_overrides", self.lr_overrides,
              f"name=lr,... with names among {', '.join(ALL)}, lr > 0")
        for name in ("sft_args", "rl_args", "dpo_args", "pairs_args"):  # compare sets these itself
            keys = {item.partition("=")[0] for item in getattr(self, name).split(",") if item}
            check(not keys & SET_BY_COMPARE, name, getattr(self, name),
                  f"key=value,... without {', '.join(sorted(SET_BY_COMPARE))}")


def _options(text: str) -> list[str]:
    """'a=1,b=x' -> ['--a=1', '--b=x'] (validated by the command's own parser)."""
    return [f"--{item}" for item in filter(None, text.split(","))]


# options that decide only when a run evaluates and checkpoints, or when it stops (`reusable`)
SCHEDULE_ONLY = {"eval_every", "eval_every_s", "time_budget", "max_iters", "resume"}


def stops_alike(saved: dict, asked: dict, it: int, seconds: float) -> bool:
    """Would a run with `asked`'s limits stop where the saved run stopped (after iteration `it`, at
    `seconds` of training), not earlier and not later?"""
    def stopped_by(c):  # c's own limits end a run at this point
        return it >= c["max_iters"] or 0 < c["time_budget"] <= seconds
    not_earlier = asked["max_iters"] >= it and (
        asked["time_budget"] in (saved["time_budget"], 0) or asked["time_budget"] > seconds)
    # a run that neither limit stopped ended on a limit both configs share (dpo's epochs)
    return not_earlier and (stopped_by(asked) or not stopped_by(saved))


def reusable(folder: str, config) -> str:
    """'done' if folder holds a finished run of this config, 'partial' if an unfinished one, else
    'new'. A finished run whose options differ only in evaluation cadence, or in stopping limits
    it would have stopped at alike, is the same training run (evaluated at other points) and
    counts as done. A run saved by another version of minidtrpo is refused (`same_options`)."""
    ckpt = os.path.join(folder, "checkpoint.pt")
    if not os.path.exists(ckpt):
        return "new"
    state = read_saved(ckpt, "a checkpoint of a compare run",
                       ("config", "finished", "model_config"))
    same_options(state["config"], config, ckpt)
    saved, asked = state["config"], asdict(config)
    differ = {k for k in asked if saved.get(k) != asked[k]}
    if not differ - {"resume"}:
        return "done" if state["finished"] else "partial"
    if state["finished"] and differ <= SCHEDULE_ONLY and \
            stops_alike(saved, asked, state["iter"], state["train_seconds"]):
        return "done"
    return "new"


def sft_argv(cfg: CompareConfig) -> list[str]:
    return [f"--task={cfg.task}", f"--task_options={cfg.task_options}", f"--layout={cfg.layout}",
            f"--time_budget={cfg.sft_budget}", f"--eval_n={cfg.eval_n}", f"--device={cfg.device}",
            f"--out_dir={os.path.join(cfg.out_dir, 'sft')}", *_options(cfg.sft_args)]


def pairs_argv(cfg: CompareConfig, init: str, seed: int) -> list[str]:
    return [f"--init={init}", f"--seed={seed}", f"--device={cfg.device}",
            f"--out={os.path.join(cfg.out_dir, f'pairs_seed{seed}.pt')}", *_options(cfg.pairs_args)]


def run_argv(cfg: CompareConfig, name: str, seed: int, init: str) -> tuple[str, type, list[str]]:
    """(command, its config class, its options) of objective `name` for one seed."""
    argv = [f"--init={init}", f"--seed={seed}", f"--time_budget={cfg.budget}",
            "--eval_every=0", f"--eval_every_s={cfg.eval_every_s}",
            f"--eval_n={cfg.eval_n}", f"--device={cfg.device}",
            f"--out_dir={os.path.join(cfg.out_dir, name, f'seed{seed}')}"]
    lr = parse_options(cfg.lr_overrides).get(name)
    argv += [f"--lr={lr}"] if lr is not None else []
    if name in OBJECTIVES:
        return "rl", RLConfig, [*argv, f"--objective={name}", *_options(cfg.rl_args)]
    pairs = os.path.join(cfg.out_dir, f"pairs_seed{seed}.pt")
    return "dpo", DPOConfig, [*argv, f"--pairs={pairs}", f"--estimator={name[4:]}",
                              *_options(cfg.dpo_args)]


def sft_start(cfg: CompareConfig) -> str:
    """The SFT checkpoint every objective starts from: trained once, then reused."""
    path = os.path.join(cfg.out_dir, "sft", "checkpoint.pt")
    # an interrupted SFT start is resumed; a finished one (or one saved before checkpoints said
    # whether they were) is reused, whatever its options
    partial = os.path.exists(path) and not read_saved(path, "a checkpoint", CHECKPOINT).get(
        "finished", True)
    if os.path.exists(path) and not partial:
        print(f"SFT start: reusing {path} (delete it to train a new one)")
        return path
    train_sft(parse(SFTConfig, sft_argv(cfg) + ["--resume"] * partial, "sft"))
    return path


def pairs_file(cfg: CompareConfig, init: str, seed: int) -> str:
    """Pairs for the DPO runs of one seed, sampled once from the start (outside the budget)."""
    pcfg = parse(PairsConfig, pairs_argv(cfg, init, seed), "pairs")
    if not os.path.exists(pcfg.out) or \
            read_saved(pcfg.out, "a pairs file", ("config",))["config"] != asdict(pcfg):
        make_pairs(pcfg)
    return pcfg.out


def run_one(cfg: CompareConfig, name: str, seed: int, init: str) -> str:
    """Run (or reuse, or resume) one objective for one seed; returns its folder."""
    kind, cls, argv = run_argv(cfg, name, seed, init)
    if kind == "dpo":
        pairs_file(cfg, init, seed)
    run_cfg = parse(cls, argv, kind)
    status = reusable(run_cfg.out_dir, run_cfg)
    print(f"\n=== {name}, seed {seed}: {status} run in {run_cfg.out_dir}")
    if status == "done":
        return run_cfg.out_dir
    argv += ["--resume"] if status == "partial" else []
    if cfg.subprocess:
        if subprocess.run([sys.executable, "-m", "minidtrpo", kind, *argv]).returncode != 0:
            raise RunStopped(f"the {name} run (seed {seed}) failed; see its output above")
    else:
        (train_rl if kind == "rl" else train_dpo)(parse(cls, argv, kind))
    return run_cfg.out_dir


def summarise(folder: str) -> dict:
    """One run's numbers from its metrics.jsonl: first and final evaluation, costs per iteration."""
    rows = read_metrics(os.path.join(folder, "metrics.jsonl"))
    evals = [r for r in rows if "test_exact" in r]
    # skipped updates excluded
    updates = [r for r in rows if "test_exact" not in r and r["update_s"] > 0]

    def mean(key):
        values = [r[key] for r in updates if key in r]
        return sum(values) / len(values) if values else float("nan")

    return {"start_exact": evals[0]["test_exact"], "final_exact": evals[-1]["test_exact"],
            "final_reward": evals[-1]["test_reward"], "iters": evals[-1]["iter"],
            "update_s": mean("update_s"), "rollout_s": mean("rollout_s"),
            "passes": mean("passes_per_response"),
            "peak_saved_mb": max([r["peak_saved_mb"] for r in updates] or [float("nan")]),
            "rss_mb": max([r.get("rss_mb", float("nan")) for r in updates] or [float("nan")]),
            "curve": [(r["train_seconds"], r["iter"], r["test_exact"], r["test_reward"])
                      for r in evals]}


# two-sided 95% quantiles of Student's t with n − 1 degrees of freedom, n = 2..10 seeds (then 1.96)
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def interval(values: list[float]) -> float:
    """Half-width of the 95% confidence interval of the mean of `values` (t, n − 1 dof); NaN for one
    value. It says how far the mean over these seeds may be from the mean over all seeds."""
    n = len(values)
    if n < 2:
        return math.nan
    # CI = mean ± t_{0.975, n−1} · s / √n,  s the sample standard deviation
    return T95.get(n, 1.96) * statistics.stdev(values) / math.sqrt(n)


def table(results: dict) -> str:
    """Markdown table: one row per objective, seeds pooled (final exact: mean ± 95% interval, and
    [min–max] over seeds)."""
    head = ("| objective | seeds | start exact | final exact, mean ± 95% CI [min–max] | "
            "final reward | rollout s/iter | update s/iter | passes/response | "
            "peak saved MB (activation proxy) | peak RSS MB | iterations |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, runs in results.items():
        def mean(key, fmt):
            value = sum(r[key] for r in runs) / len(runs)
            return "—" if value != value else format(value, fmt)  # NaN (DPO: no rollouts): a dash
        finals = [100 * r["final_exact"] for r in runs]
        half = interval(finals)
        ci = "" if half != half else f" ± {half:.1f}"
        lines.append(f"| {name} | {len(runs)} | {100 * float(mean('start_exact', '')):.1f}% | "
                     f"{statistics.fmean(finals):.1f}%{ci} [{min(finals):.1f}–{max(finals):.1f}] "
                     f"| {mean('final_reward', '.3f')} | {mean('rollout_s', '.2f')} | "
                     f"{mean('update_s', '.2f')} | {mean('passes', '.1f')} | "
                     f"{mean('peak_saved_mb', '.0f')} | {mean('rss_mb', '.0f')} | "
                     f"{mean('iters', '.0f')} |")
    return "\n".join(lines)


def plot(results: dict, path: str, seeds: str = "", eval_n: int = 500):
    """Test exact accuracy against training seconds and against the share of each run's
    iterations: every seed thin, their mean bold with a min–max band up to where every seed
    reached, and the final checkpoints' mean as a dot with a min–max bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, (name, runs) in enumerate(results.items()):
        ys = [np.array([100 * p[2] for p in r["curve"]]) for r in runs]  # test exact, %
        for ax, xs in zip(axes, (
                [np.array([p[0] for p in r["curve"]]) for r in runs],  # training seconds
                [np.array([p[1] / max(r["curve"][-1][1], 1) for p in r["curve"]]) for r in runs])):
            for x, y in zip(xs, ys):
                ax.plot(x, y, color=f"C{k}", lw=0.6, alpha=0.35)
            grid = np.linspace(0, min(x[-1] for x in xs), 80)  # the range every seed reached
            on_grid = np.stack([np.interp(grid, x, y) for x, y in zip(xs, ys)])
            ax.plot(grid, on_grid.mean(0), color=f"C{k}", lw=1.8, label=name)
            ax.fill_between(grid, on_grid.min(0), on_grid.max(0), color=f"C{k}", alpha=0.15, lw=0)
            finals = np.array([y[-1] for y in ys])
            ax.errorbar(np.mean([x[-1] for x in xs]), finals.mean(), fmt="o", color=f"C{k}",
                        yerr=[[finals.mean() - finals.min()], [finals.max() - finals.mean()]],
                        capsize=3)
    axes[0].set(xlabel="training seconds (rollouts + updates; evaluation excluded)",
                ylabel=f"test exact, % of {eval_n} problems (greedy)")
    axes[1].set(xlabel="share of the run's iterations (RL) or updates (DPO)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"seeds {seeds}: thin = one seed, bold = their mean with a min–max band, "
                 "dot = final checkpoints' mean with a min–max bar", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(cfg: CompareConfig) -> str:
    """Run the head-to-head; returns the markdown table (also printed and written to compare.md)."""
    names, seeds = cfg.objectives.split(","), [int(s) for s in cfg.seeds.split(",")]
    # every command this head-to-head will run, parsed with its exact options before any of them
    init = cfg.init or os.path.join(cfg.out_dir, "sft", "checkpoint.pt")
    if not cfg.init:
        parse(SFTConfig, sft_argv(cfg), "sft")
    for name in names:
        for seed in seeds:
            kind, cls, argv = run_argv(cfg, name, seed, init)
            parse(cls, argv, kind)
            if kind == "dpo":
                parse(PairsConfig, pairs_argv(cfg, init, seed), "pairs")
    if cfg.init:
        load(cfg.init)  # a missing or damaged start stops here, before any run
    os.makedirs(cfg.out_dir, exist_ok=True)
    init = cfg.init or sft_start(cfg)
    results = {name: [summarise(run_one(cfg, name, seed, init)) for seed in seeds]
               for name in names}
    text = table(results)
    # With --init the options of the SFT start play no part: left out, so as not to mislead.
    unused = {"task", "task_options", "layout", "sft_budget", "sft_args"} if cfg.init else ()
    command = ("python -m minidtrpo compare "
               + " ".join(f"--{k}={v}" for k, v in asdict(cfg).items() if k not in unused))
    budget = (f"each run at its command's count, capped at {cfg.budget:g} training seconds"
              if cfg.budget else "each run at its command's count")
    with open(os.path.join(cfg.out_dir, "compare.md"), "w") as f:
        f.write(f"# Head-to-head\n\n`{command}`\n\nstart: `{init}`; "
                f"{budget}; seeds {cfg.seeds}; final checkpoint, "
                f"greedy decoding of {cfg.eval_n} test problems.\n\n"
                f"{text}\n\n![compare](compare.png)\n")
    plot(results, os.path.join(cfg.out_dir, "compare.png"), cfg.seeds, cfg.eval_n)
    print("\n" + text)
    return text
