"""Decoding rules side by side on trained models: passes, seconds and test accuracy.

    python -m minidtrpo sft --task=sudoku --layout=block --time_budget=60 \
        --out_dir=runs/sudoku_block
    python -m minidtrpo sft --task=addition --block_size=1 --max_steps=700 \
        --out_dir=runs/addition_b1
    python bench/bench_decoding.py            # ~20 s on a 2-core CPU once the two models exist
    python bench/bench_decoding.py --ckpts=runs/a/checkpoint.pt,runs/b/checkpoint.pt --device=cuda

For each checkpoint, the fixed test problems are decoded greedily (τ = 0, KV cache on) under each
rule of `sampling.generate` (docs/math.md §3 "Decoding rules"), the first being LLaDA's one token
per step with low confidence, the baseline of every speed-up:
- forward passes per response: the decoding steps this response needed, summed over its blocks (the
  parallel rules stop a sequence's block when it is full; a batch waits for its slowest sequence,
  so the batch's own count, also reported, is larger);
- seconds to decode all problems in one batch, and response tokens per second;
- test exact accuracy and reward.
The speed-up of a rule is the baseline's passes over its own. Ends with one JSON line:
{"rules": [{"task", "name", "passes_per_response", "seconds", "exact"}, ...]}.
"""

import json
import os
import sys
import time
from dataclasses import dataclass

import torch

from minidtrpo.config import (Config, arg, device_arg, exit_on_bad_input, folder_problem, parse,
                              pick_device)
from minidtrpo.train import load, rollout

RULES = {  # name -> generate's options; the first is the baseline
    "one token per step, low confidence": {},
    "one token per step, random": dict(remasking="random"),
    "two tokens per step (T_B = b/2)": dict(steps_per_block="half"),
    "ascending (CJ-GRPO)": dict(schedule="ascending"),
    "ascending + EOS rejection 0.1": dict(schedule="ascending", eos_factor=0.1),
    "threshold 0.99": dict(remasking="threshold", threshold=0.99),
    "threshold 0.95": dict(remasking="threshold", threshold=0.95),
    "threshold 0.9": dict(remasking="threshold", threshold=0.9),
    "threshold 0.7": dict(remasking="threshold", threshold=0.7),
    "trace credit 0.95": dict(remasking="credit", threshold=0.95),
    "trace credit 0.9 (CreditDecoding)": dict(remasking="credit", threshold=0.9),
    "trace credit 0.7": dict(remasking="credit", threshold=0.7),
}


@dataclass
class DecodingBenchConfig(Config):
    """Every decoding rule on each checkpoint's test problems: passes, seconds, accuracy."""
    ckpts: str = arg("runs/sudoku_block/checkpoint.pt,runs/addition_b1/checkpoint.pt",
                     "comma-separated checkpoints (the commands above make the defaults)")
    n: int = arg(500, "fixed test problems per checkpoint", ge=1)
    device: str = device_arg()
    out: str = arg("runs/bench_decoding", "folder for the JSON", valid=folder_problem)


def own_steps(traj) -> torch.Tensor:
    """(B,) decoding steps each response needed: the distinct steps at which it revealed tokens."""
    us = traj.unmask_step
    ordered = us.sort(1).values
    new = torch.ones_like(us, dtype=torch.bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    return (new & (ordered >= 0)).sum(1).float()


def bench(model, task, prompts, options, device) -> dict:
    b = model.config.block_size
    if options.get("steps_per_block") == "half":
        options = {**options, "steps_per_block": max(b // 2, 1)}
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    traj, reward, exact = rollout(model, task, prompts, temperature=0.0, chunk=len(prompts),
                                  eos_id=task.vocab.eos_id, **options)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"passes_per_response": own_steps(traj).mean().item(),
            "batch_passes": traj.num_steps, "seconds": seconds,
            "tokens_per_s": traj.responses.numel() / seconds,
            "exact": exact.float().mean().item(), "reward": reward.mean().item()}


def main():
    args = parse(DecodingBenchConfig, sys.argv[1:], "python bench/bench_decoding.py")
    paths = list(filter(None, args.ckpts.split(",")))
    for path in paths:  # every checkpoint checked before any work
        load(path)
    device = pick_device(args.device)
    rows = []
    for path in paths:
        model, task = load(path, device)
        model.eval()
        prompts, _ = task.test_set(args.n)  # the fixed test problems `eval` scores
        prompts = prompts.to(device)
        bench(model, task, prompts[:8], {}, device)  # warm-up
        print(f"\n{path}: {task!r}, layout={model.config.layout}, b = {model.config.block_size}, "
              f"L = {model.config.response_len}, {args.n} test problems, greedy, {device}")
        print("| rule | passes/response | batch passes | seconds | tokens/s | exact | reward | "
              "speed-up |\n|---|---|---|---|---|---|---|---|")
        base = None
        for name, options in RULES.items():
            r = {"task": task.name, "ckpt": path, "name": name,
                 **bench(model, task, prompts, options, device)}
            base = base or r
            r["speedup"] = base["passes_per_response"] / r["passes_per_response"]
            rows.append(r)
            print(f"| {name} | {r['passes_per_response']:.2f} | {r['batch_passes']} | "
                  f"{r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {100 * r['exact']:.1f}% | "
                  f"{r['reward']:.3f} | {r['speedup']:.2f}× |")
        solved = {r["name"]: round(r["exact"] * args.n) for r in rows if r["ckpt"] == path}
        near = [r for r in rows if r["ckpt"] == path  # within 1 point: counted in problems
                and solved[r["name"]] >= solved[base["name"]] - args.n / 100]
        fast = max(near, key=lambda r: r["speedup"])  # the baseline itself is always near
        print(f"fewest passes per response within 1 point of the baseline's "
              f"{100 * base['exact']:.1f}%: {fast['name']} ({100 * fast['exact']:.1f}%, "
              f"{fast['speedup']:.2f}× fewer passes)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_decoding.json"), "w") as f:
        json.dump({"device": str(device), "threads": torch.get_num_threads(), "rows": rows}, f,
                  indent=1)
    print(json.dumps({"rules": [{k: r[k] for k in ("task", "name", "passes_per_response",
                                                   "seconds", "exact")} for r in rows]}))


if __name__ == "__main__":
    exit_on_bad_input(main)
