"""Supervised masked-diffusion training (SFT), one iteration of train.run_loop per optimizer step.

SFT (docs/math.md §2; LLaDA, arXiv 2502.09992, eq. 3–4): t ~ U(ε, 1), mask each response token
independently with probability t, predict the masked tokens, weight by 1/t. Departures:
1. Only the response is ever masked (the prompt is the condition), as in LLaDA's SFT.
2. Block layout: the input is [x ; y ; y_t] with the block-diffusion mask (BD3-LM, arXiv
   2503.09573), so noisy block k is predicted from the clean blocks < k, the state the sampler
   shows it. One t per sequence is shared by all its blocks.
3. Fresh task examples every step (an infinite stream), AdamW, warm-up then cosine decay, gradient
   clipping, and an exponential moving average (EMA) of the weights: what is evaluated and saved.
4. Data parallel (torchrun), every process draws the whole batch and its noise and trains on its
   share of the rows: the step is the one-process step (tests/test_distributed.py).

Shapes: B batch, P prompt length, L response length, V vocab.
"""

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .config import BadInput, arg, autocast, check, folder_problem, parse_options
from .meters import elapsed
from .model import LAYOUTS, MaskedDiffusionTransformer, ModelConfig, clean_noisy_mask
from .tasks import TASKS, get_task
from .parallel import data_parallel, init_parallel, share
from .train import RunConfig, clip_and_step, load, lr_at, run_loop


@dataclass
class SFTConfig(RunConfig):
    """Supervised masked-diffusion training (SFT) of the toy dLLM on one task."""
    task: str = arg("sudoku", "task to train on", TASKS)
    # key=value pairs, because each task has its own options (validated by the task's constructor)
    task_options: str = arg("", "task options as key=value,... (e.g. digits=4 or max_blanks=12)")
    layout: str = arg("block", "attention layout", LAYOUTS)
    d_model: int = arg(128, "residual width", ge=1, group="model")
    n_layers: int = arg(4, "transformer blocks", ge=1, group="model")
    n_heads: int = arg(4, "attention heads", ge=1, group="model")
    block_size: int = arg(4, "response tokens per block b", ge=1, group="model")
    init: str = arg("", "start from this checkpoint's weights (same architecture)")
    batch_size: int = arg(128, "sequences per step", ge=1)
    lr: float = arg(2e-3, "peak AdamW learning rate", gt=0)
    min_lr_ratio: float = arg(0.1, "final learning rate as a fraction of lr, cosine decay (1: "
                                   "constant)", ge=0, le=1, group="optimizer")
    warmup_steps: int = arg(50, "linear warm-up steps", ge=0, group="optimizer")
    t_min: float = arg(1e-3, "noise levels t ~ U(t_min, 1) (LLaDA's ε; 1: every response token "
                             "masked, the autoregressive loss in the block layout with "
                             "block_size = 1)", gt=0, le=1, group="optimizer")
    ema: float = arg(0.99, "EMA decay of the evaluated weights (0: no EMA)", ge=0, lt=1,
                       group="optimizer")
    max_steps: int = arg(300, "optimizer steps of the run, the schedule's length (sudoku's recipe; "
                              "each task's own where the command line leaves it)", ge=1)
    eval_every: int = arg(100, "evaluate and checkpoint every this many steps (0: at the end)",
                          ge=0, group="evaluation")
    out_dir: str = arg("runs/sft", "run folder: config.json, metrics.jsonl, checkpoint.pt, curves",
                       valid=folder_problem)
    compile: bool = arg(False, "torch.compile the model (opt-in)", group="model")

    @classmethod
    def defaults(cls, given: dict) -> dict:
        """On the command line, the options not given take the task's recipe where it has one:
        its decoding block and `Task.sft_recipe` (e.g. the star graph: 2 layers, batch 32)."""
        name = given.get("task", cls.task)
        if name not in TASKS:  # refused by __post_init__, naming the option
            return {}
        task = task_from(name, given.get("task_options", cls.task_options))
        return {"block_size": task.block_size, **task.sft_recipe}

    def __post_init__(self):
        super().__post_init__()
        task = task_from(self.task, self.task_options)
        b = self.block_size
        check(task.response_len % b == 0, "block_size", self.block_size,
              f"a divisor of the response length {task.response_len}")
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


def sft_loss(model, prompts, answers, generator=None, t_min: float = 1e-3, rows=slice(None)):
    """Masked-diffusion loss of a batch (prompts (B, P), answers (B, L)) -> (loss, stats).
    t_min: the lowest noise level. t_min = 1 masks every response token (t = 1, weight 1): in the
    block layout with block size 1 that is the exact autoregressive loss, the other noise levels
    adding only variance (docs/math.md §2). rows: the rows scored (a process's share, data
    parallel); the noise is drawn for all B, so a row's t and mask do not depend on the split."""
    cfg = model.config
    B, L = answers.shape
    device = answers.device
    # t ~ U(t_min, 1), one noise level per sequence (LLaDA eq. 3; docs/math.md §2)
    t = t_min + (1 - t_min) * torch.rand(B, 1, generator=generator, device=device)  # (B, 1)
    masked = torch.rand(B, L, generator=generator, device=device) < t  # (B, L) each masked w.p. t
    prompts, answers, t, masked = prompts[rows], answers[rows], t[rows], masked[rows]
    B, P = prompts.shape
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


def model_config(task, **sizes) -> ModelConfig:
    """A ModelConfig for a task: its vocabulary and lengths, its default block, then `sizes`."""
    return ModelConfig(**{"vocab_size": task.vocab.size, "mask_id": task.vocab.mask_id,
                          "prompt_len": task.prompt_len, "response_len": task.response_len,
                          "block_size": task.block_size, **sizes})


def build(cfg: SFTConfig):
    """The task and a fresh model, initialised from cfg.seed (the global RNG is left intact)."""
    task = task_from(cfg.task, cfg.task_options)
    sizes = dict(layout=cfg.layout, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                 block_size=cfg.block_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # parameter initialisation only
        model = MaskedDiffusionTransformer(model_config(task, **sizes))
    return task, model


def train_sft(cfg: SFTConfig) -> dict:
    """Run SFT as configured; returns the final test metrics. Ctrl-C saves a checkpoint first."""
    rank, world, device = init_parallel(cfg.device)
    rows = share(cfg.batch_size, rank, world, "batch_size")  # this process's rows of each batch
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
    fwd = data_parallel(model, world)  # DDP for several processes: gradients all-reduced
    fwd = torch.compile(fwd) if cfg.compile else fwd
    b, L = model.config.block_size, task.response_len
    seq_tokens = task.prompt_len + (2 * L - b if cfg.layout == "block" else L)  # tokens per row

    def iteration(step):
        t0 = time.perf_counter()
        lr = lr_at(cfg.lr, step, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        prompts, answers = task.sample(cfg.batch_size, "train", gens["data"])
        prompts, answers = prompts.to(device), answers.to(device)
        with autocast(device):
            loss, stats = sft_loss(fwd, prompts, answers, gens["noise"], cfg.t_min, rows)
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
