"""Supervised masked-diffusion training (SPEC §2), evaluation, checkpoints.

LLaDA, arXiv 2502.09992, eq. 3–4: t ~ U(ε, 1), mask each response token independently with probability t,
and train the model to predict the masked tokens, weighting by 1/t. The result upper-bounds the negative
log-likelihood per token. Departures:
1. Only the response is ever masked (the prompt is the condition), as in LLaDA's SFT.
2. Block layout: the input is [x ; y ; y_t] with the block-diffusion mask (BD3-LM, arXiv 2503.09573), so
   noisy block k is predicted from the clean blocks < k, exactly the state the sampler shows it. One t per
   sequence is shared by all its blocks.
3. Fresh task examples every step (an infinite stream), AdamW, warm-up then cosine decay, gradient
   clipping, and an exponential moving average (EMA) of the weights, which is what gets evaluated and saved.

Shapes: B batch, P prompt length, L response length, V vocab.
"""

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import arg, atomic_save, autocast, parse_options, pick_device, write_json
from .model import LAYOUTS, MaskedDiffusionTransformer, ModelConfig, clean_noisy_mask
from .sampling import generate
from .tasks import TASKS, get_task


@dataclass
class TrainConfig:
    """Supervised masked-diffusion training (SFT) of the toy dLLM on one task."""
    task: str = arg("sudoku", "task to train on", TASKS)
    task_options: str = arg("", "task options as key=value,... (e.g. digits=4 or max_blanks=12)")
    layout: str = arg("block", "attention layout", LAYOUTS)
    d_model: int = arg(128, "residual width")
    n_layers: int = arg(4, "transformer blocks")
    n_heads: int = arg(4, "attention heads")
    block_size: int = arg(0, "response tokens per block b (0: the task's default)")
    init: str = arg("", "start from this checkpoint's weights (e.g. a curriculum stage); model options then come from it")
    seed: int = arg(0, "seed of initialisation, data and masks")
    batch_size: int = arg(128, "sequences per step")
    lr: float = arg(2e-3, "peak AdamW learning rate")
    min_lr_ratio: float = arg(0.1, "final learning rate as a fraction of lr (cosine decay)")
    warmup_steps: int = arg(50, "linear warm-up steps")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    grad_clip: float = arg(1.0, "gradient norm clip (0: off)")
    ema: float = arg(0.99, "EMA decay of the evaluated weights (0: no EMA)")
    max_steps: int = arg(100_000, "stop after this many optimizer steps")
    time_budget: float = arg(0.0, "stop after this many seconds of training, evaluation excluded (0: no limit)")
    eval_every: int = arg(100, "evaluate on the test set every this many steps (0: only at the end)")
    eval_n: int = arg(500, "test problems per evaluation")
    steps_per_block: int = arg(0, "sampler steps per block T_B at evaluation (0: block_size)")
    device: str = arg("auto", "auto | cpu | cuda | mps")
    out_dir: str = arg("runs/sft", "run folder: config.json, metrics.jsonl, checkpoint.pt, curves.png")
    resume: bool = arg(False, "continue the run saved in out_dir")
    compile: bool = arg(False, "torch.compile the model (opt-in)")


def sft_loss(model, prompts, answers, generator=None, eps: float = 1e-3):
    """Masked-diffusion loss of a batch (prompts (B, P), answers (B, L)) -> (loss, stats)."""
    cfg = model.config
    B, L = answers.shape
    P = prompts.shape[1]
    device = answers.device
    t = eps + (1 - eps) * torch.rand(B, 1, generator=generator, device=device)  # (B, 1) t ~ U(ε, 1)
    masked = torch.rand(B, L, generator=generator, device=device) < t  # (B, L) each token masked w.p. t
    noisy = answers.masked_fill(masked, cfg.mask_id)  # y_t
    if cfg.layout == "block":  # [x ; y ; y_t]: the clean copy and the noisy copy share position ids
        # No noisy block looks at the last clean block (noisy block k sees clean blocks < k), so that block
        # is left out: [x ; y_{<last} ; y_t], P + 2L − b tokens, the same logits for fewer FLOPs.
        C = L - cfg.block_size  # clean tokens kept
        tokens = torch.cat([prompts, answers[:, :C], noisy], dim=1)  # (B, P+C+L)
        positions = torch.cat([torch.arange(P + C, device=device), torch.arange(P, P + L, device=device)])
        keep = torch.cat([torch.arange(P + C), torch.arange(P + L, P + 2 * L)]).to(device)
        mask = clean_noisy_mask(P, L, cfg.block_size, device)[keep][:, keep]  # (P+C+L, P+C+L)
        logits = model(tokens, positions, mask)[:, P + C:]  # (B, L, V) predictions at the noisy copy
    else:
        logits = model(torch.cat([prompts, noisy], dim=1))[:, P:]  # (B, L, V)
    logp = -F.cross_entropy(logits.flatten(0, 1), answers.flatten(), reduction="none").view(B, L)  # log μ_θ(y_i|x,y_t)
    # L_SFT = −E_t [ (1/t) · Σ_{i masked} log μ_θ(y_i | x, y_t) ] / L   (only masked positions carry a target)
    loss = -((logp * masked) / t).sum(dim=1).mean() / L
    with torch.no_grad():
        acc = ((logits.argmax(-1) == answers) & masked).sum() / masked.sum().clamp(min=1)
    return loss, {"loss": loss.item(), "masked_acc": acc.item()}


@torch.no_grad()
def evaluate(model, task, prompts, answers, *, steps_per_block=None, temperature=0.0, batch_size=500,
             generator=None) -> dict:
    """Decode every prompt and score it: {"exact": fraction fully correct, "reward": mean reward, "n": count}."""
    exact, reward = [], []
    for i in range(0, len(prompts), batch_size):
        traj = generate(model, prompts[i:i + batch_size], steps_per_block=steps_per_block or None,
                        temperature=temperature, generator=generator)
        p, r = prompts[i:i + batch_size].cpu(), traj.responses.cpu()
        exact.append(task.exact(p, r).float())
        reward.append(task.reward(p, r).float())
    exact, reward = torch.cat(exact), torch.cat(reward)
    return {"exact": exact.mean().item(), "reward": reward.mean().item(), "n": len(prompts)}


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio·lr over the run (progress in [0, 1])."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def build(cfg: TrainConfig):
    """The task and a fresh model for a TrainConfig."""
    task = get_task(cfg.task, **parse_options(cfg.task_options))
    overrides = dict(layout=cfg.layout, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads)
    if cfg.block_size:
        overrides["block_size"] = cfg.block_size
    return task, MaskedDiffusionTransformer(ModelConfig.for_task(task, **overrides))


def load(path: str, device="cpu"):
    """Reload a checkpoint written by any minidtrpo run -> (model, task). Weights only, never pickled code."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    task = get_task(ckpt["task"], **ckpt["task_options"])
    model = MaskedDiffusionTransformer(ModelConfig(**ckpt["model_config"]), verbose=False).to(device)
    model.load_state_dict(ckpt["model"])
    return model, task


def checkpoint_dict(cfg, model, task, extra: dict) -> dict:
    """What every checkpoint holds: the model to evaluate, its config, the task, and the run's own state."""
    return {"model": model.state_dict(), "model_config": asdict(model.config), "task": task.name,
            "task_options": parse_options(cfg.task_options), "train_config": asdict(cfg), **extra}


def plot_curves(metrics_path: str, out_path: str):
    """Training loss and test accuracy against training seconds, from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(metrics_path)]
    train = [r for r in rows if "loss" in r]
    test = [r for r in rows if "test_exact" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot([r["train_seconds"] for r in train], [r["loss"] for r in train], lw=0.8)
    a.set(xlabel="training seconds", ylabel="masked-diffusion loss", yscale="log", title="SFT loss")
    b.plot([r["train_seconds"] for r in test], [r["test_exact"] for r in test], "o-", label="exact")
    b.plot([r["train_seconds"] for r in test], [r["test_reward"] for r in test], "s--", label="reward")
    b.set(xlabel="training seconds", ylabel="test score (greedy decoding)", ylim=(0, 1), title="test set")
    b.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def train_sft(cfg: TrainConfig) -> dict:
    """Run SFT as configured; returns the final test metrics. Ctrl-C saves a checkpoint before stopping."""
    device = pick_device(cfg.device)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path, metrics_path = os.path.join(cfg.out_dir, "checkpoint.pt"), os.path.join(cfg.out_dir, "metrics.jsonl")
    torch.manual_seed(cfg.seed)  # parameter initialisation; data and masks use their own generator
    task, model = build(cfg)
    if cfg.init:  # continue from earlier weights (same architecture), on this config's task and options
        init_model, _ = load(cfg.init)
        if init_model.config.layout != cfg.layout or init_model.num_params() != model.num_params():
            raise ValueError(f"--init={cfg.init} has layout={init_model.config.layout} and "
                             f"{init_model.num_params()} parameters; this run asks for layout={cfg.layout} and "
                             f"{model.num_params()} (set --layout/--d_model/--n_layers/--n_heads to match)")
        model.load_state_dict(init_model.state_dict())
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema > 0 else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    data_gen = torch.Generator().manual_seed(cfg.seed)  # task examples (CPU)
    noise_gen = torch.Generator(device).manual_seed(cfg.seed + 1)  # t and masks (on the training device)
    step, train_seconds = 0, 0.0
    if cfg.resume:
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["raw_model"])
        ema.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        data_gen.set_state(state["data_rng"].cpu())
        noise_gen.set_state(state["noise_rng"].cpu())
        step, train_seconds = state["step"], state["train_seconds"]
        print(f"resumed {ckpt_path} at step {step}")
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run starts a fresh log
    write_json(asdict(cfg), os.path.join(cfg.out_dir, "config.json"))
    print("config:", json.dumps(asdict(cfg)))
    fwd = torch.compile(model) if cfg.compile else model
    test_prompts, test_answers = (x.to(device) for x in task.test_set(cfg.eval_n))
    b = model.config.block_size
    seq_tokens = task.prompt_len + (2 * task.response_len - b if cfg.layout == "block" else task.response_len)

    def save():
        extra = {"raw_model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                 "train_seconds": train_seconds, "data_rng": data_gen.get_state(), "noise_rng": noise_gen.get_state()}
        atomic_save(checkpoint_dict(cfg, ema, task, extra), ckpt_path)

    def log(row):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def run_eval():
        ema.eval()
        m = evaluate(ema, task, test_prompts, test_answers, steps_per_block=cfg.steps_per_block)
        ema.train()
        log({"step": step, "train_seconds": round(train_seconds, 2), "test_exact": m["exact"], "test_reward": m["reward"]})
        save()
        return m

    def done():
        return step >= cfg.max_steps or (cfg.time_budget > 0 and train_seconds >= cfg.time_budget)

    bar = tqdm(total=cfg.max_steps if not cfg.time_budget else None, initial=step, desc="sft", dynamic_ncols=True,
               mininterval=1.0, disable=None)  # no bar when the output is not a terminal
    metrics = {}
    try:
        while not done():
            t0 = time.perf_counter()
            progress = max(step / cfg.max_steps, train_seconds / cfg.time_budget if cfg.time_budget else 0.0)
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step, progress)
            prompts, answers = (x.to(device) for x in task.sample(cfg.batch_size, "train", generator=data_gen))
            with autocast(device):
                loss, stats = sft_loss(fwd, prompts, answers, noise_gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if ema is not model:  # θ_ema ← d·θ_ema + (1 − d)·θ, with d warming up so early weights fade fast
                d = min(cfg.ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    for pe, p in zip(ema.parameters(), model.parameters()):
                        pe.lerp_(p, 1 - d)
            step += 1
            dt = time.perf_counter() - t0
            train_seconds += dt
            log({"step": step, "train_seconds": round(train_seconds, 3), "lr": opt.param_groups[0]["lr"],
                 "tokens_per_s": round(cfg.batch_size * seq_tokens / dt), **stats})
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['masked_acc']:.2f}",
                            exact=f"{metrics.get('exact', float('nan')):.2f}", s=f"{train_seconds:.0f}")
            if cfg.eval_every and step % cfg.eval_every == 0 and not done():
                metrics = run_eval()
        metrics = run_eval()
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {step}: saving {ckpt_path} (continue with --resume)")
        save()
        raise
    finally:
        bar.close()
        if os.path.exists(metrics_path):
            plot_curves(metrics_path, os.path.join(cfg.out_dir, "curves.png"))
    print(json.dumps({"step": step, "train_seconds": round(train_seconds, 1), **metrics}))
    return metrics
