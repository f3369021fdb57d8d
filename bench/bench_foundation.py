"""Foundation benchmark: SFT throughput and MFU, and the sampler with and without its KV cache.

    python bench/bench_foundation.py            # ~1 minute on a 2-core CPU
    python bench/bench_foundation.py --device=cuda

Everything is measured side by side in one run:
1. the machine's fp32 matmul rate (1024×1024 products), the denominator of MFU;
2. SFT training tokens/s of the default model (sudoku, block layout: [prompt ; clean ; noisy]
   = P + 2L − b tokens per sequence, the last clean block being left out), and model-FLOPs
   utilisation = 6 · parameters · tokens/s ÷ matmul rate (attention score FLOPs are not counted,
   as in nanoGPT's estimate);
3. sampler throughput at response length 64, block 8, batch 256, one token per step, with the KV
   cache for finished blocks and without it (every step recomputes the whole sequence), and whether
   the two decoded the same tokens.
"""

import json
import sys
import time
from dataclasses import dataclass

import torch

from minidtrpo.config import (Config, arg, autocast, device_arg, exit_on_bad_input, parse,
                              pick_device)
from minidtrpo.model import MaskedDiffusionTransformer, ModelConfig
from minidtrpo.sampling import generate
from minidtrpo.tasks import get_task
from minidtrpo.sft import model_config, sft_loss
from minidtrpo.train import clip_and_step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_rate(device, n=1024) -> float:
    """Measured fp32 (bf16 on CUDA, the precision training uses there) matmul FLOP/s."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 50 if device.type == "cuda" else 5
    seconds = timed(lambda: [a @ b for _ in range(reps)], device, repeat=5)
    return 2 * n**3 * reps / seconds


def bench_sft(device, batch_size=128, steps=10) -> dict:
    task = get_task("sudoku")
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the global RNG as it was
        torch.manual_seed(0)
        model = MaskedDiffusionTransformer(model_config(task)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))  # as train_sft
    gen = torch.Generator().manual_seed(0)
    noise = torch.Generator(device).manual_seed(0)

    def step():
        prompts, answers = (x.to(device) for x in task.sample(batch_size, generator=gen))
        with autocast(device):
            loss, _ = sft_loss(model, prompts, answers, noise)
        loss.backward()
        clip_and_step(model, opt, 1.0)  # the optimizer step of train_sft's iteration

    seconds = timed(step, device, repeat=steps)
    # sft_loss's sequence
    tokens = batch_size * (task.prompt_len + 2 * task.response_len - task.block_size)
    return {"params": model.num_params(), "step_s": seconds, "tokens_per_s": tokens / seconds,
            "flops_per_s": 6 * model.num_params() * tokens / seconds}


def bench_sampler(device, batch_size=256, response_len=64, block_size=8) -> dict:
    cfg = ModelConfig(vocab_size=48, mask_id=47, prompt_len=16, response_len=response_len,
                      block_size=block_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MaskedDiffusionTransformer(cfg, verbose=False).to(device)
    # a fresh init predicts almost uniformly; spread its logits so that float rounding does not
    # decide near-ties, as it would not for a trained model
    with torch.no_grad():
        model.head.weight.mul_(20.0)
    prompts = torch.randint(0, 46, (batch_size, 16),
                            generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    for cache in (True, False):
        def run():
            with autocast(device):
                out[cache] = generate(model, prompts, temperature=1.0, kv_cache=cache,
                                      generator=torch.Generator(device).manual_seed(0))
        out[f"seconds_{cache}"] = timed(run, device, repeat=3, warmup=1)
    same = torch.equal(out[True].tokens, out[False].tokens)
    return {"cached_s": out["seconds_True"], "uncached_s": out["seconds_False"],
            "speedup": out["seconds_False"] / out["seconds_True"], "identical_tokens": same,
            "tokens_per_s_cached": batch_size * response_len / out["seconds_True"]}


@dataclass
class BenchConfig(Config):
    """SFT throughput and MFU, and the sampler with and without the KV cache."""
    device: str = device_arg()


def main():
    args = parse(BenchConfig, sys.argv[1:], "python bench/bench_foundation.py")
    device = pick_device(args.device)
    rate = matmul_rate(device)
    sft = bench_sft(device)
    sampler = bench_sampler(device)
    print(f"\nthreads {torch.get_num_threads()}, matmul {rate / 1e9:.0f} GFLOP/s")
    print(f"SFT  {sft['params'] / 1e6:.2f}M params: {sft['step_s'] * 1e3:.0f} ms/step, "
          f"{sft['tokens_per_s']:,.0f} tokens/s, {sft['flops_per_s'] / 1e9:.0f} GFLOP/s, "
          f"MFU {sft['flops_per_s'] / rate:.0%}")
    print(f"sampler L=64 b=8 B=256: cached {sampler['cached_s']:.2f} s, "
          f"recomputed {sampler['uncached_s']:.2f} s, speed-up {sampler['speedup']:.1f}x, "
          f"identical tokens: {sampler['identical_tokens']}")
    print(json.dumps({"device": str(device), "matmul_gflops": rate / 1e9, "sft": sft,
                      "sampler": sampler}))


if __name__ == "__main__":
    exit_on_bad_input(main)
