"""The one run loop of every kind of run (sft, rl, dpo), and supervised masked-diffusion training.

`run_loop` calls an algorithm's `iteration(it, train_seconds)` until a step or time budget is
spent and does the rest the same way for every kind of run: the metrics log, periodic greedy
evaluation, atomic checkpoints, exact resume, Ctrl-C, the progress bar and the figure. An
algorithm module (rl.py, preference.py, and SFT below) only says what one iteration is.

SFT (docs/math.md §2; LLaDA, arXiv 2502.09992, eq. 3–4): t ~ U(ε, 1), mask each response token
independently with probability t, predict the masked tokens, weight by 1/t. Departures:
1. Only the response is ever masked (the prompt is the condition), as in LLaDA's SFT.
2. Block layout: the input is [x ; y ; y_t] with the block-diffusion mask (BD3-LM, arXiv
   2503.09573), so noisy block k is predicted from the clean blocks < k, the state the sampler
   shows it. One t per sequence is shared by all its blocks.
3. Fresh task examples every step (an infinite stream), AdamW, warm-up then cosine decay, gradient
   clipping, and an exponential moving average (EMA) of the weights: what is evaluated and saved.

Shapes: B batch, P prompt length, L response length, V vocab.
"""

import copy
import fcntl
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import (BadInput, Config, RunStopped, arg, atomic_save, autocast, check,
                     device_problem, folder_problem, parse_options, pick_device, read_saved,
                     write_json)
from .meters import elapsed
from .model import LAYOUTS, MaskedDiffusionTransformer, ModelConfig, clean_noisy_mask
from .sampling import Trajectory, generate
from .tasks import TASKS, get_task


@dataclass
class RunConfig(Config):
    """What every kind of run (sft, rl, dpo) shares."""
    seed: int = arg(0, "seed of every generator of the run (one per purpose)", ge=0, lt=2**31)
    time_budget: float = arg(0.0, "stop after this many training seconds, evaluation excluded "
                                  "(0: no limit)", ge=0)
    eval_every: int = arg(10, "evaluate and checkpoint every this many iterations (0: at the end)",
                          ge=0)
    eval_every_s: float = arg(0.0, "also evaluate each time this many more training seconds passed",
                              ge=0)
    eval_n: int = arg(500, "fixed test problems per evaluation (greedy decoding)", ge=1)
    steps_per_block: int = arg(0, "sampler steps per block T_B at evaluation (0: block_size)", ge=0)
    device: str = arg("auto", "auto | cpu | cuda | cuda:N | mps", valid=device_problem)
    out_dir: str = arg("runs/run", "run folder: config.json, metrics.jsonl, checkpoint.pt, curves",
                       valid=folder_problem)
    resume: bool = arg(False, "continue the run saved in out_dir")
    lr: float = arg(1e-4, "AdamW learning rate (rl, dpo: constant; tune per objective: README)",
                    gt=0)
    weight_decay: float = arg(0.0, "AdamW weight decay", ge=0)
    grad_clip: float = arg(1.0, "gradient norm clip (0: off)", ge=0)


@dataclass
class SFTConfig(RunConfig):
    """Supervised masked-diffusion training (SFT) of the toy dLLM on one task."""
    task: str = arg("sudoku", "task to train on", TASKS)
    # key=value pairs, because each task has its own options (validated by the task's constructor)
    task_options: str = arg("", "task options as key=value,... (e.g. digits=4 or max_blanks=12)")
    layout: str = arg("block", "attention layout", LAYOUTS)
    d_model: int = arg(128, "residual width", ge=1)
    n_layers: int = arg(4, "transformer blocks", ge=1)
    n_heads: int = arg(4, "attention heads", ge=1)
    block_size: int = arg(0, "response tokens per block b (0: the task's default)", ge=0)
    init: str = arg("", "start from this checkpoint's weights (same architecture)")
    batch_size: int = arg(128, "sequences per step", ge=1)
    lr: float = arg(2e-3, "peak AdamW learning rate", gt=0)
    min_lr_ratio: float = arg(0.1, "final learning rate as a fraction of lr (cosine decay)",
                              ge=0, le=1)
    warmup_steps: int = arg(50, "linear warm-up steps", ge=0)
    ema: float = arg(0.99, "EMA decay of the evaluated weights (0: no EMA)", ge=0, lt=1)
    max_steps: int = arg(100_000, "stop after this many optimizer steps", ge=1)
    eval_every: int = arg(100, "evaluate and checkpoint every this many steps (0: at the end)",
                          ge=0)
    out_dir: str = arg("runs/sft", "run folder: config.json, metrics.jsonl, checkpoint.pt, curves",
                       valid=folder_problem)
    compile: bool = arg(False, "torch.compile the model (opt-in)")

    def __post_init__(self):
        super().__post_init__()
        task = task_from(self.task, self.task_options)
        b = self.block_size or task.block_size
        check(task.response_len % b == 0, "block_size", self.block_size,
              f"0 or a divisor of the response length {task.response_len}")
        check(self.steps_per_block <= b, "steps_per_block", self.steps_per_block,
              f"0..{b}, the block size")
        check(self.d_model % self.n_heads == 0 and self.d_model // self.n_heads % 2 == 0,
              "n_heads", self.n_heads, f"a divisor of d_model={self.d_model} giving even heads")


def task_from(name: str, options: str):
    """The task `name` with its `key=value,...` options; a bad option: one clear ValueError."""
    try:
        return get_task(name, **parse_options(options))
    except ValueError as e:
        raise ValueError(f"--task_options={options!r}: {e}") from None


# --------------------------------------------------------------------------------------------------
# Checkpoints, decoding and evaluation


CHECKPOINT = ("model", "model_config", "task", "task_options")  # what every checkpoint holds


def load(path: str, device="cpu"):
    """Reload a checkpoint of any minidtrpo run -> (model, task). Weights only, no pickled code;
    a missing, damaged or wrong-kind file raises BadInput naming the path."""
    ckpt = read_saved(path, "a minidtrpo checkpoint", CHECKPOINT, device)
    try:
        task = get_task(ckpt["task"], **ckpt["task_options"])
        model = MaskedDiffusionTransformer(ModelConfig(**ckpt["model_config"]), verbose=False)
        model.to(device).load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:  # fields or weights that do not fit
        raise BadInput(f"{path}: a damaged checkpoint ({type(e).__name__}); expected a minidtrpo "
                       "checkpoint") from None
    return model, task


def check_steps(steps_per_block: int, model):
    """--steps_per_block must fit the model's block (0: one token per step): else BadInput."""
    b = model.config.block_size
    if steps_per_block > b:
        raise BadInput(f"--steps_per_block={steps_per_block} is not valid; valid: 0..{b}, the "
                       "block size of the checkpoint")


@torch.no_grad()
def rollout(model, task, prompts, *, temperature=0.0, remasking="low_confidence", steps_per_block=0,
            generator=None, chunk=1024):
    """Decode one response per prompt (B, P), recording the trajectory, and score it with the task.

    Returns (Trajectory, rewards (B,), exact (B,)) on the prompts' device."""
    with autocast(prompts.device):
        traj = Trajectory.cat([
            generate(model, prompts[i:i + chunk], temperature=temperature, remasking=remasking,
                     steps_per_block=steps_per_block or None, generator=generator)
            for i in range(0, len(prompts), chunk)])
    p, r = traj.prompts.cpu(), traj.responses.cpu()
    return traj, task.reward(p, r).to(prompts.device), task.exact(p, r).to(prompts.device)


def evaluate(model, task, prompts, *, steps_per_block=0, temperature=0.0, generator=None) -> dict:
    """Decode and score every prompt: {"exact": share fully correct, "reward": mean, "n": count}."""
    _, reward, exact = rollout(model, task, prompts, temperature=temperature, generator=generator,
                               steps_per_block=steps_per_block, chunk=500)
    return {"exact": exact.float().mean().item(), "reward": reward.mean().item(), "n": len(prompts)}


# --------------------------------------------------------------------------------------------------
# The optimizer step and the run loop


def clip_and_step(model, opt, grad_clip) -> float:
    """Clip the gradient norm (0: off), step, zero the gradients; return the unclipped norm. A
    non-finite norm (a NaN or inf loss or gradient) skips the step: the run loop counts it."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if torch.isfinite(norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm.item()


def finite(modules) -> bool:
    return all(torch.isfinite(p).all() for m in modules for p in m.parameters())


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl; a last line cut short by a kill is dropped, with a warning."""
    lines = open(path).read().splitlines() if os.path.exists(path) else []
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise BadInput(f"{path}: line {i + 1} is not JSON; the log is damaged") from None
            print(f"warning: {path}: dropped a damaged last line (a run was killed writing it)")
    return rows


def remove_stale_files(out_dir):
    """Temporary files a killed run left behind. Called under the folder's lock, so no live run
    is writing any of them."""
    for name in os.listdir(out_dir):
        if name.endswith(".tmp"):
            os.remove(os.path.join(out_dir, name))


MAX_BAD_ITERS = 10  # a run stops after this many iterations in a row with a non-finite step


class FolderLock:
    """One run per folder: the run holds an exclusive lock on out_dir/lock (fcntl.flock, released
    by the kernel when the process ends, killed or not); a second run there gets BadInput."""

    def __init__(self, folder):
        self.path = os.path.join(folder, "lock")

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            pid = self.file.read().strip()
            self.file.close()
            raise BadInput(f"{os.path.dirname(self.path)} is in use by a live run (pid {pid}); "
                           "wait for it or choose another --out_dir") from None
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc):
        self.file.close()  # releases the lock; the file stays, empty of meaning


# options that may differ when a run is resumed (how long and how often, where); any other
# difference means another run
RESUMABLE = {"resume", "time_budget", "max_iters", "max_steps", "epochs", "eval_every",
             "eval_every_s", "device", "out_dir"}


def resume_state(cfg, kind, models, task, device) -> dict:
    """The checkpoint of the run in cfg.out_dir, after checking that it is a run of this kind, task,
    model and options (RESUMABLE aside); BadInput names what differs. Nothing is changed before."""
    path = os.path.join(cfg.out_dir, "checkpoint.pt")
    state = read_saved(path, f"the checkpoint of a run ({kind}) to resume",
                       (*CHECKPOINT, "kind", "optimizer", "rng", "iter", "config"), device)
    ours = {"kind": kind, "task": task.name, "task_options": dict(task.options),
            "model_config": asdict(models["model"].config),
            **{k: v for k, v in asdict(cfg).items() if k not in RESUMABLE}}
    saved = {**state, **state["config"]}
    differ = [f"{k}={saved.get(k)!r} there, {v!r} here" for k, v in ours.items()
              if saved.get(k) != v]
    if differ:
        raise BadInput(f"--resume: {cfg.out_dir} holds another run: " + "; ".join(differ))
    return state


def interrupt_on_sigterm():
    """SIGTERM (timeout, a scheduler, docker stop) ends a run like Ctrl-C: snapshot saved."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def run_loop(cfg, kind, *, models, task, opt, generators, iteration, max_iters, device,
             frozen=None, bar_keys=(), eval_at_start=True) -> dict:
    """Call iteration(it, train_seconds) for it = 0, 1, ... until max_iters or cfg.time_budget; log,
    evaluate, checkpoint. Returns the last evaluation's metrics.

    models: {name: module} that training changes, saved in every checkpoint; models["model"] is
    evaluated and is what `load` returns. frozen: {name: module} saved too, never changed (the
    reference), so left out of snapshots. iteration(...) -> the metrics row of that iteration,
    its timed seconds in rollout_s and update_s and its non-finite (skipped) optimizer steps in
    skipped_steps. Every
    random draw must come from `generators`: their states, the models and the optimizer go into
    every checkpoint, so a run interrupted and resumed (cfg.resume) writes the same metrics as an
    uninterrupted one. Ctrl-C saves the state as of the last finished iteration (a snapshot) and
    re-raises; after a kill, the rows logged since the last checkpoint are dropped on resume and
    written again. An iteration that skipped a step or left a non-finite weight is undone (weights
    and optimizer back to the snapshot); MAX_BAD_ITERS of them in a row stop the run (RunStopped).
    """
    state = resume_state(cfg, kind, models, task, device) if cfg.resume else None
    os.makedirs(cfg.out_dir, exist_ok=True)
    interrupt_on_sigterm()
    with FolderLock(cfg.out_dir):
        return _loop(cfg, kind, models, frozen or {}, task, opt, generators, iteration, max_iters,
                     device, bar_keys, eval_at_start, state)


def _loop(cfg, kind, models, frozen, task, opt, generators, iteration, max_iters, device,
          bar_keys, eval_at_start, state):
    remove_stale_files(cfg.out_dir)
    ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    run = {"iter": 0, "train_seconds": 0.0, "pending_eval": eval_at_start,  # evaluate next?
           "bad_streak": 0, "skipped_steps": 0}  # non-finite iterations in a row, steps in all
    if state is not None:
        load_run_state(state, {**models, **frozen}, opt, generators)
        run.update({k: state.get(k, v) for k, v in run.items()})
        # rows written after the checkpoint are redone: drop them (and an unfinished evaluation's)
        rows = [r for r in read_metrics(metrics_path) if r.get("iter", -1) < run["iter"] or
                (r["iter"] == run["iter"] and not (run["pending_eval"] and "test_exact" in r))]
        tmp = f"{metrics_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, metrics_path)  # a kill during the rewrite leaves the old log whole
        print(f"resumed {ckpt_path} at iteration {run['iter']}")
    else:  # a fresh run starts a fresh log, and an old run's checkpoint must not be resumed
        for path in (metrics_path, ckpt_path):
            if os.path.exists(path):
                os.remove(path)
    write_json(asdict(cfg), os.path.join(cfg.out_dir, "config.json"))
    print("config:", json.dumps(asdict(cfg)))
    test_prompts = task.test_set(cfg.eval_n)[0].to(device)

    def mutable():  # what changes during a run (a snapshot copies it)
        return {**{name: m.state_dict() for name, m in models.items()},
                "optimizer": opt.state_dict(),
                "rng": {name: g.get_state() for name, g in generators.items()}, **run}

    def save(state):  # "finished" tells a caller (compare) a complete run from an interrupted one
        if not finite(models.values()):  # never reached (bad iterations are undone): a guard
            raise RunStopped(f"not saving {ckpt_path}: a weight is not finite")
        atomic_save({**state, **{name: m.state_dict() for name, m in frozen.items()},
                     "finished": done(state) and not state["pending_eval"], "kind": kind,
                     "model_config": asdict(models["model"].config), "task": task.name,
                     "task_options": dict(task.options), "config": asdict(cfg)}, ckpt_path)

    def log(row):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def done(state=None):
        state = run if state is None else state
        return state["iter"] >= max_iters or 0 < cfg.time_budget <= state["train_seconds"]

    bar = tqdm(total=None if cfg.time_budget else max_iters, initial=run["iter"], desc=kind,
               dynamic_ncols=True, mininterval=1.0, disable=None)  # disable=None: no bar off a tty
    snapshot, metrics, stopped = None, {}, None
    try:
        while True:
            if run["pending_eval"]:
                # temperature 0: no randomness, so an evaluation never changes the run
                metrics = evaluate(models["model"], task, test_prompts,
                                   steps_per_block=cfg.steps_per_block)
                log({"iter": run["iter"], "train_seconds": round(run["train_seconds"], 3),
                     "test_exact": metrics["exact"], "test_reward": metrics["reward"]})
                run["pending_eval"] = False
                if run["bad_streak"] == 0:  # during a non-finite streak the weights are suspect
                    save(mutable())
            if done():
                break
            snapshot = copy.deepcopy(mutable())  # Ctrl-C inside the iteration goes back to here
            row = iteration(run["iter"], run["train_seconds"])
            bad = (row.get("skipped_steps", 0) > 0 or not finite(models.values())
                   or any(isinstance(v, float) and not math.isfinite(v) for v in row.values()))
            if bad:  # undo the iteration's updates; its draws stay spent (the next one differs)
                load_run_state(snapshot, models, opt, {})
                row["skipped_steps"] = max(row.get("skipped_steps", 0), 1)
            run["bad_streak"] = run["bad_streak"] + 1 if bad else 0
            run["skipped_steps"] += row.get("skipped_steps", 0)
            before = run["train_seconds"]
            run["train_seconds"] += row.get("rollout_s", 0.0) + row["update_s"]
            run["iter"] += 1
            log({"iter": run["iter"], "train_seconds": round(run["train_seconds"], 3), **row})
            if run["bad_streak"] >= MAX_BAD_ITERS:
                kept = (f"{ckpt_path} keeps the state before them" if os.path.exists(ckpt_path)
                        else "no checkpoint was written")
                stopped = (f"stopped: {MAX_BAD_ITERS} iterations in a row had a non-finite loss, "
                           f"gradient, weight or metric; {kept}")
                break
            every_s = cfg.eval_every_s > 0 and \
                run["train_seconds"] // cfg.eval_every_s > before // cfg.eval_every_s
            every = cfg.eval_every and run["iter"] % cfg.eval_every == 0
            run["pending_eval"] = bool(every or every_s or done())
            snapshot = None
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in bar_keys if k in row} |
                            {"test": f"{metrics.get('exact', math.nan):.3f}",
                             "s": f"{run['train_seconds']:.0f}", "skipped": run["skipped_steps"]})
    except KeyboardInterrupt:
        at = (snapshot or run)["iter"]
        print(f"\ninterrupted: saving {ckpt_path} at iteration {at} (continue with --resume)")
        save(snapshot if snapshot is not None else mutable())
        raise
    finally:
        bar.close()
        if os.path.exists(metrics_path):
            plot_run(metrics_path, os.path.join(cfg.out_dir, "curves.png"), bar_keys)
    evals = [r for r in read_metrics(metrics_path) if "test_exact" in r]
    if not metrics and evals:  # resumed a finished run (or stopped): report its last evaluation
        metrics = {"exact": evals[-1]["test_exact"], "reward": evals[-1]["test_reward"],
                   "n": cfg.eval_n}
    print(json.dumps({"iter": run["iter"], "train_seconds": round(run["train_seconds"], 1),
                      "skipped_steps": run["skipped_steps"], **metrics,
                      **({"stopped": stopped} if stopped else {})}))
    if stopped:
        raise RunStopped(stopped)
    return metrics


def load_run_state(state, models, opt, generators):
    """Put a checkpoint's (or snapshot's) weights, optimizer and generator states in place."""
    for name, module in models.items():
        module.load_state_dict(state[name])
    opt.load_state_dict(state["optimizer"])
    for name, g in generators.items():
        g.set_state(state["rng"][name].cpu())


def plot_run(metrics_path, out_path, keys):
    """Test scores against training seconds, each of `keys` against iterations (metrics.jsonl)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics_path)
    test, train = [r for r in rows if "test_exact" in r], [r for r in rows if "test_exact" not in r]
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4 * (1 + len(keys)), 3.3), squeeze=False)
    a = axes[0, 0]
    seconds = [r["train_seconds"] for r in test]
    a.plot(seconds, [r["test_exact"] for r in test], "o-", label="exact")
    a.plot(seconds, [r["test_reward"] for r in test], "s--", label="reward")
    a.set(xlabel="training seconds", ylabel="test score (greedy)", ylim=(0, 1), title="test set")
    a.legend()
    for a, key in zip(axes[0, 1:], keys):
        a.plot([r["iter"] for r in train if key in r], [r[key] for r in train if key in r], lw=0.8)
        a.set(xlabel="iteration", title=key)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Supervised masked-diffusion training


def sft_loss(model, prompts, answers, generator=None, eps: float = 1e-3):
    """Masked-diffusion loss of a batch (prompts (B, P), answers (B, L)) -> (loss, stats)."""
    cfg = model.config
    B, L = answers.shape
    P = prompts.shape[1]
    device = answers.device
    t = eps + (1 - eps) * torch.rand(B, 1, generator=generator, device=device)  # (B, 1) t ~ U(ε, 1)
    masked = torch.rand(B, L, generator=generator, device=device) < t  # (B, L) each masked w.p. t
    noisy = answers.masked_fill(masked, cfg.mask_id)  # y_t
    if cfg.layout == "block":  # [x ; y ; y_t]: the clean copy and the noisy copy share position ids
        # No noisy block looks at the last clean block (noisy block k sees clean blocks < k), so
        # it is left out: [x ; y_{<last} ; y_t], P + 2L − b tokens, same logits for fewer FLOPs.
        C = L - cfg.block_size  # clean tokens kept
        tokens = torch.cat([prompts, answers[:, :C], noisy], dim=1)  # (B, P+C+L)
        positions = torch.cat([torch.arange(P + C, device=device),
                               torch.arange(P, P + L, device=device)])
        keep = torch.cat([torch.arange(P + C), torch.arange(P + L, P + 2 * L)]).to(device)
        mask = clean_noisy_mask(P, L, cfg.block_size, device)[keep][:, keep]  # (P+C+L, P+C+L)
        logits = model(tokens, positions, mask)[:, P + C:]  # (B, L, V) at the noisy copy
    else:
        logits = model(torch.cat([prompts, noisy], dim=1))[:, P:]  # (B, L, V)
    # log μ_θ(y_i | x, y_t) at every response position
    logp = -F.cross_entropy(logits.flatten(0, 1), answers.flatten(), reduction="none").view(B, L)
    # L_SFT = −E_t [(1/t) · Σ_{i masked} log μ_θ(y_i | x, y_t)] / L   (visible tokens: no target)
    loss = -((logp * masked) / t).sum(dim=1).mean() / L
    with torch.no_grad():
        acc = ((logits.argmax(-1) == answers) & masked).sum() / masked.sum().clamp(min=1)
    return loss, {"loss": loss.item(), "masked_acc": acc.item()}


def lr_at(cfg: SFTConfig, step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio·lr over the run (progress in [0, 1])."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def model_config(task, **sizes) -> ModelConfig:
    """A ModelConfig for a task: its vocabulary and lengths, its default block, then `sizes`."""
    return ModelConfig(**{"vocab_size": task.vocab.size, "mask_id": task.vocab.mask_id,
                          "prompt_len": task.prompt_len, "response_len": task.response_len,
                          "block_size": task.block_size, **sizes})


def build(cfg: SFTConfig):
    """The task and a fresh model, initialised from cfg.seed (the global RNG is left intact)."""
    task = task_from(cfg.task, cfg.task_options)
    sizes = dict(layout=cfg.layout, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                 block_size=cfg.block_size or task.block_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # parameter initialisation only
        model = MaskedDiffusionTransformer(model_config(task, **sizes))
    return task, model


def train_sft(cfg: SFTConfig) -> dict:
    """Run SFT as configured; returns the final test metrics. Ctrl-C saves a checkpoint first."""
    device = pick_device(cfg.device)
    task, model = build(cfg)
    if cfg.init:  # continue from earlier weights (same architecture) on this config's task
        init_model, _ = load(cfg.init)
        if asdict(init_model.config) != asdict(model.config):
            raise BadInput(f"--init={cfg.init} has model {asdict(init_model.config)}; this run "
                             f"asks for {asdict(model.config)} (set --layout, --d_model, ...)")
        model.load_state_dict(init_model.state_dict())
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema > 0 else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                            weight_decay=cfg.weight_decay)
    gens = {"data": torch.Generator().manual_seed(cfg.seed),  # task examples (CPU)
            "noise": torch.Generator(device).manual_seed(cfg.seed + 1)}  # t and masks (device)
    fwd = torch.compile(model) if cfg.compile else model
    b, L = model.config.block_size, task.response_len
    seq_tokens = task.prompt_len + (2 * L - b if cfg.layout == "block" else L)  # tokens per row

    def iteration(step, train_seconds):
        t0 = time.perf_counter()
        by_time = train_seconds / cfg.time_budget if cfg.time_budget else 0.0
        progress = max(step / cfg.max_steps, by_time)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, progress)
        prompts, answers = task.sample(cfg.batch_size, "train", gens["data"])
        prompts, answers = prompts.to(device), answers.to(device)
        with autocast(device):
            loss, stats = sft_loss(fwd, prompts, answers, gens["noise"])
        loss.backward()
        norm = clip_and_step(model, opt, cfg.grad_clip)  # a non-finite norm: step skipped
        if ema is not model:  # θ_ema ← d·θ_ema + (1 − d)·θ, d warming up so early weights fade fast
            d = min(cfg.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(p, 1 - d)
        dt = elapsed(t0, device)
        return {"lr": opt.param_groups[0]["lr"], **stats, "grad_norm": norm, "update_s": dt,
                "skipped_steps": int(not math.isfinite(norm)),
                "tokens_per_s": round(cfg.batch_size * seq_tokens / dt)}

    models = {"model": ema} if ema is model else {"model": ema, "raw_model": model}
    return run_loop(cfg, "sft", models=models, task=task, opt=opt, generators=gens,
                    iteration=iteration, max_iters=cfg.max_steps, device=device,
                    bar_keys=("loss", "masked_acc"), eval_at_start=False)
