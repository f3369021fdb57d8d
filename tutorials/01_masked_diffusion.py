# %% [markdown]
# # Tutorial 1: a masked-diffusion language model small enough for a laptop
#
# This tutorial introduces the toy diffusion LM (dLLM) that the rest of `minidtrpo` trains with RL:
#
# 1. the tasks and their shared character vocabulary;
# 2. the model and its two attention layouts, "block" and "full", plus the [prompt ; clean ; noisy]
#    layout that trains the block model;
# 3. the masked-diffusion loss of LLaDA (arXiv 2502.09992, eq. 3–4): why only masked positions
#    count, and where the 1/t weight comes from;
# 4. a short supervised run on 4×4 sudoku with the library's `sft.train_sft`;
# 5. decoding with `generate`, and the `Trajectory` it records, shown step by step;
# 6. the KV-cached sampler, checked token for token against the uncached one.
#
# Run it as a script, `python tutorials/01_masked_diffusion.py` (about a minute on one CPU thread),
# or open it as a notebook (VS Code and Jupyter with jupytext treat the `# %%` lines as cells). With
# `MINIDTRPO_TUTORIAL_QUICK=1` every budget shrinks to a smoke test of a few seconds, and the
# trained model's numbers then mean little. Each claim in the text is checked by an `assert` or a
# printed number in the code cell below it.

# %%
import math
import os
import sys
import time
from pathlib import Path

# tiny model, few steps: a smoke test
QUICK = os.environ.get("MINIDTRPO_TUTORIAL_QUICK", "0") == "1"

try:  # as a script: this file's folder; as a notebook, the kernel starts in the notebook's folder
    HERE = Path(__file__).resolve().parent
except NameError:
    HERE = Path.cwd()
sys.path.insert(0, str(HERE.parent))  # so that a fresh clone runs without `pip install -e .`
OUT = HERE / "out"  # figures and checkpoints (git-ignored)
OUT.mkdir(exist_ok=True)

import matplotlib

matplotlib.use("Agg")  # write image files; never open a window
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from minidtrpo import MaskedDiffusionTransformer, generate, get_task
from minidtrpo.model import clean_noisy_mask, layout_mask
from minidtrpo.sampling import reveal_schedule
from minidtrpo.tasks import TASKS
from minidtrpo.sft import SFTConfig, model_config, sft_loss, train_sft
from minidtrpo.train import evaluate, load

torch.manual_seed(0)  # parameter initialisation of the models built in this file
print(f"quick mode: {QUICK}; figures go to {OUT}")

# %% [markdown]
# ## 1. Tasks and vocabulary
#
# All tasks share one character vocabulary: 46 characters `0-9 + - * / = , : | ( ) a-z` (ids 0..45,
# so digit d has id d), then `EOS` (46), which ends a text and pads prompts and answers to a fixed
# length, and `MASK` (47), the diffusion mask token, which never occurs in data. A task fixes the
# prompt length P and the response length L (a multiple of its block size b). It generates (prompt,
# answer) pairs whose train and test splits never overlap, and its reward lies in [0, 1] and never
# raises, whatever the tokens, because RL feeds it raw model output.

# %%
task = get_task("sudoku")
vocab = task.vocab
print(f"vocabulary: {vocab.size} tokens = {len(vocab.chars)} characters + EOS (id {vocab.eos_id}) "
      f"+ MASK (id {vocab.mask_id})")
for name in TASKS:
    other = get_task(name)
    p, a = other.sample(1, "train", generator=torch.Generator().manual_seed(0))
    print(f"  {other!r}\n      prompt {other.response_text(p[0])!r:28} "
          f"answer {other.response_text(a[0])!r:22} "
          f"reward(answer) = {other.reward(p, a).item():.1f}")
    assert other.reward(p, a).item() == 1.0

train_grids = {tuple(a) for a in
               task.sample(1000, "train", generator=torch.Generator().manual_seed(0))[1].tolist()}
test_grids = {tuple(a) for a in task.test_set(300)[1].tolist()}
print(f"sudoku: {len(train_grids)} solution grids among 1000 train puzzles, "
      f"{len(test_grids)} among 300 test puzzles, shared: {len(train_grids & test_grids)} "
      f"(the split is by solution grid; there are 288 grids)")
assert not train_grids & test_grids


# %% [markdown]
# Here is a 4×4 sudoku (`0` marks a blank). Each row, column and 2×2 box must hold 1..4. The prompt
# is the puzzle as 16 digits, and the answer is the whole solved grid. With a block size of 4, each
# response block is one row of the grid. The reward is the fraction of blanks filled correctly, and
# "exact" means that all 16 cells are right.

# %%
def show(ids) -> str:
    """Response ids as text with one "|" per block of 4: MASK renders as "_", EOS as "·"."""
    chars = [vocab.decode([i]) or "·" for i in torch.as_tensor(ids).tolist()]
    return "|".join("".join(chars[i:i + 4]) for i in range(0, len(chars), 4))


prompts, answers = task.sample(3, "train",
                               generator=torch.Generator().manual_seed(1))  # (3, P), (3, L)
puzzle, solution = task.decode_problem(prompts[0]), task.response_text(answers[0])
print("puzzle    solution")
for r in range(4):
    print(f"{puzzle[4 * r:4 * r + 4]}      {solution[4 * r:4 * r + 4]}")
print(f"prompt ids : {prompts[0].tolist()}")
print(f"answer ids : {answers[0].tolist()}   "
      f"(P = {task.prompt_len}, L = {task.response_len}, b = {task.block_size})")

blanks = [i for i, c in enumerate(puzzle) if c == "0"]
wrong = answers[:1].clone()
wrong[0, blanks[0]] = 1 + wrong[0, blanks[0]] % 4  # one blank filled with a wrong digit
masks_only = torch.full_like(answers[:1], vocab.mask_id)
junk = torch.randint(0, vocab.size, (5, task.response_len),
                     generator=torch.Generator().manual_seed(0))
r_right = task.reward(prompts[:1], answers[:1]).item()
r_wrong = task.reward(prompts[:1], wrong).item()
r_masks = task.reward(prompts[:1], masks_only).item()
r_junk = task.reward(prompts[:1].expand(5, -1), junk)
print(f"reward: solution {r_right:.3f}, one of {len(blanks)} blanks wrong {r_wrong:.3f}, "
      f"all MASK {r_masks:.3f}, random tokens {[round(x, 2) for x in r_junk.tolist()]}")
assert r_right == 1.0 and abs(r_wrong - (1 - 1 / len(blanks))) < 1e-6 and r_masks == 0.0
assert ((0 <= r_junk) & (r_junk <= 1)).all()

# %% [markdown]
# ## 2. The model and its attention layouts
#
# `MaskedDiffusionTransformer` is a small pre-norm transformer *without* a causal mask. It reads
# [prompt ; partly masked response] and predicts the clean token at every position:
# $\mu_\theta(v \mid x, y_t) = \mathrm{softmax}(\mathrm{logits}_\theta(x, y_t))[v]$. It has no time
# input, because the share of MASK tokens in the input tells it how noisy the sequence is (as in
# LLaDA). The logit of MASK itself is set to $-\infty$, since MASK is never a valid prediction.
#
# The boolean attention mask (True means "may attend") comes in two layouts:
#
# - **full** (LLaDA): every position attends to every position.
# - **block** (block diffusion, BD3-LM, arXiv 2503.09573): the prompt is block 0, and a response
#   position in block $k$ attends to the prompt and to response blocks $\le k$. Attention is
#   bidirectional inside a block and causal across blocks. Because nothing attends to a *later*
#   block, (a) the keys and values of finished blocks never change, so the sampler can cache them
#   (§6), and (b) dTRPO's single-pass estimator is exact (tutorial 2).
#
# The block model is trained, and scored by the estimators, on **[x ; y ; ỹ]** of length P + 2L. The
# clean copy y and the noisy copy ỹ share position ids. Noisy block k attends to the prompt, to the
# clean blocks < k, and to itself, which is exactly what it would see in the sampler's state
# "blocks < k decoded, block k partly masked". A single forward pass therefore trains, or scores,
# every block at once.

# %%
cfg_block = model_config(task, layout="block", d_model=32, n_layers=2)
cfg_full = model_config(task, layout="full", d_model=32, n_layers=2)
P, L, b = task.prompt_len, task.response_len, task.block_size
masks = {"full layout\n[prompt ; response]": layout_mask(cfg_full),
         "block layout\n[prompt ; response]": layout_mask(cfg_block),
         "block diffusion training / scoring\n[prompt ; clean y ; noisy ỹ]":
             clean_noisy_mask(P, L, b)}
fig, axes = plt.subplots(1, 3, figsize=(13, 5.2))
for ax, (title, m) in zip(axes, masks.items()):
    ax.imshow(m.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    edges = [P] + [P + k * b for k in range(1, L // b)]
    if m.shape[0] > P + L:  # [prompt ; clean y ; noisy ỹ]: the noisy copy's blocks too
        edges += [P + L] + [P + L + k * b for k in range(1, L // b)]
    for e in edges:  # block boundaries
        ax.axhline(e - 0.5, color="tab:red", lw=0.6 if e not in (P, P + L) else 1.4)
        ax.axvline(e - 0.5, color="tab:red", lw=0.6 if e not in (P, P + L) else 1.4)
    ax.set(title=title, xlabel="key position", ylabel="query position")
fig.suptitle("attention masks for sudoku (P = 16, L = 16, b = 4); black = may attend")
fig.tight_layout(rect=(0, 0, 1, 0.95))
fig.savefig(OUT / "01_attention_masks.png", dpi=110)
plt.close(fig)
print(f"saved {OUT / '01_attention_masks.png'}")

blk = layout_mask(cfg_block)
assert layout_mask(cfg_full).all()  # full: everything sees everything
assert blk[:P, :P].all() and not blk[:P, P:].any()  # the prompt sees only itself
# block 0 sees the prompt and itself
assert blk[P:P + b, :P + b].all() and not blk[P:P + b, P + b:].any()
assert blk[-b:].all()  # the last block sees everything
cn = clean_noisy_mask(P, L, b)
k = 2  # noisy block 2: prompt + clean blocks 0, 1 + noisy block 2, nothing else
row = cn[P + L + k * b]
assert (row[:P + k * b].all() and not row[P + k * b:P + L].any()
        and row[P + L + k * b:P + L + (k + 1) * b].all())
assert row.sum() == P + k * b + b
assert not cn[:P + L, P + L:].any()  # the prompt and the clean copy never look at the noisy copy

# %% [markdown]
# The same properties hold in the model itself. Below, we change the tokens of the *last* response
# block and compare the predictions μ_θ at every earlier position. In the block layout they do not
# move, while in the full layout they do. Then we check the [x ; y ; ỹ] trick: the predictions at
# noisy block k must equal those of a plain block-layout pass on the true state
# [x ; y₀..y_{k−1} ; ỹ_k ; later blocks masked]. (We compare probabilities, not logits: the MASK
# logit is −∞ everywhere, and −∞ − (−∞) is NaN.)

# %%
models = {"block": MaskedDiffusionTransformer(cfg_block),
          "full": MaskedDiffusionTransformer(cfg_full)}
x = torch.cat([prompts, answers], 1)  # (3, P+L) clean sequences
x2 = x.clone()
x2[:, -b:] = vocab.mask_id  # change the last block only
for name, m in models.items():
    with torch.no_grad():
        moved = (m(x).softmax(-1) - m(x2).softmax(-1))[:, :P + L - b].abs().max().item()
    print(f"{name:5} layout: max |Δ μ_θ| before the last block when the last block changes "
          f"= {moved:.2e}")
    assert (moved == 0.0) == (name == "block")

model = models["block"]
noisy = answers.masked_fill(
    torch.rand(answers.shape, generator=torch.Generator().manual_seed(2)) < 0.5,
    vocab.mask_id)  # ỹ: about half the tokens masked
# clean and noisy copies share ids
positions = torch.cat([torch.arange(P + L), torch.arange(P, P + L)])
with torch.no_grad():
    # (3, L, V)
    one_pass = model(torch.cat([prompts, answers, noisy], 1), positions, cn)[:, P + L:].softmax(-1)
    gap = 0.0
    for k in range(L // b):  # the true state the sampler shows block k
        state = torch.cat([answers[:, :k * b], noisy[:, k * b:(k + 1) * b],
                           torch.full((3, L - (k + 1) * b), vocab.mask_id)], 1)  # (3, L)
        # (3, b, V)
        plain = model(torch.cat([prompts, state], 1))[:, P + k * b:P + (k + 1) * b].softmax(-1)
        gap = max(gap, (plain - one_pass[:, k * b:(k + 1) * b]).abs().max().item())
print(f"[x ; y ; ỹ] single pass vs the true per-block states: max |Δ μ_θ| = {gap:.2e}")
assert gap < 1e-6

# %% [markdown]
# ## 3. The masked-diffusion loss
#
# **Forward (noising) process.** At noise level $t \in [0, 1]$, each response token is replaced by M
# independently with probability $t$, and the prompt is never masked:
# $$q_t(y_t \mid y) = \prod_{i=1}^{L}
#   \big[\,t\,\mathbb 1(y_t^i = M) + (1-t)\,\mathbb 1(y_t^i = y^i)\big].$$
#
# **Loss** (LLaDA eq. 3–4, docs/math.md §2), which `sft.sft_loss` computes:
# $$\mathcal L_{\mathrm{SFT}}(\theta)
#   = -\,\mathbb E_{t \sim U(\varepsilon, 1)}\;\mathbb E_{y_t \sim q_t}
#   \Big[\frac{1}{t} \sum_{i:\, y_t^i = M} \log \mu_\theta(y^i \mid x, y_t)\Big] \Big/ L .$$
#
# *Why only masked positions?* A visible token is part of the input, so predicting it is copying.
# The sampler never re-predicts a revealed token (the states of §5 are nested), so the model's
# output at a visible position enters no likelihood at all.
#
# *Why the 1/t weight?* Fix a set $S$ of $m$ masked positions. Under $q_t$ it has probability
# $t^m (1-t)^{L-m}$, and there are $\binom{L}{m}$ such sets. Integrating the weight over $t$ gives
# $$\int_0^1 \frac{1}{t}\binom{L}{m} t^m (1-t)^{L-m}\, dt
#   = \binom{L}{m} B(m, L-m+1) = \frac{1}{m},$$
# so the loss equals
# $$-\sum_{m=1}^{L} \mathbb E_{|S| = m}
#   \Big[\frac{1}{m}\sum_{i\in S} \log\mu_\theta(y^i \mid x, y_S)\Big] \Big/ L,$$
# the masked-diffusion negative ELBO (up to the tiny ε), where $y_S$ is y with S masked (in the
# block layout, each block also sees the clean earlier blocks). Tutorial 2 checks, by enumeration,
# that this ELBO is the average over random decoding orders of the trajectory log-likelihood and
# lies below $\log p_\theta(y \mid x)$. Without the 1/t weight, the same integral gives every m the
# weight $1/(L+1)$ instead of $1/m$, which under-counts the lightly masked inputs relative to the
# bound.
#
# First the two integrals, computed by quadrature for every m at L = 16:

# %%
t = torch.linspace(0, 1, 200_001, dtype=torch.float64)
for m in range(1, L + 1):
    # (1/t)·C(L, m)·t^m·(1 − t)^(L − m), written without the 1/t singularity
    integrand = math.comb(L, m) * t ** (m - 1) * (1 - t) ** (L - m)
    assert abs(torch.trapezoid(integrand, t).item() - 1 / m) < 1e-8
    # without the weight: C(L, m)·t^m·(1 − t)^(L − m) integrates to 1/(L + 1) for every m
    assert abs(torch.trapezoid(integrand * t, t).item() - 1 / (L + 1)) < 1e-8
print(f"∫ (1/t)·P(|S| = m) dt = 1/m and ∫ P(|S| = m) dt = 1/(L+1) for m = 1..{L}: "
      "checked by quadrature")

# %% [markdown]
# Next, the library's `sft_loss`, checked against the formula computed by hand. `sft_loss` draws t
# and then the mask from the generator we pass, so replaying the generator reproduces its draws. The
# hand-written reference scores each noisy block with a plain pass on its true state rather than
# with the [x ; y ; ỹ] trick.

# %%
gen = torch.Generator().manual_seed(3)
state0 = gen.get_state()
loss, stats = sft_loss(model, prompts, answers, gen)
gen.set_state(state0)  # replay: t ~ U(ε, 1) per sequence, then each token masked w.p. t
eps = 1e-3
t_draw = eps + (1 - eps) * torch.rand(3, 1, generator=gen)  # (B, 1)
masked = torch.rand(3, L, generator=gen) < t_draw  # (B, L)
y_t = answers.masked_fill(masked, vocab.mask_id)
with torch.no_grad():
    logp = torch.zeros(3, L)
    # block k sees the prompt, the clean blocks < k and its own noisy tokens
    for k in range(L // b):
        state = torch.cat([answers[:, :k * b], y_t[:, k * b:(k + 1) * b],
                           torch.full((3, L - (k + 1) * b), vocab.mask_id)], 1)
        logits = model(torch.cat([prompts, state], 1))[:, P + k * b:P + (k + 1) * b]  # (B, b, V)
        lp = F.log_softmax(logits, -1)
        logp[:, k * b:(k + 1) * b] = lp.gather(-1, answers[:, k * b:(k + 1) * b, None]).squeeze(-1)
    # −(1/t)·Σ_{i masked} log μ_θ(y_i | x, y_t) / L, averaged over the batch
    by_hand = (-(logp * masked).sum(1) / t_draw[:, 0] / L).mean()
print(f"sft_loss = {loss.item():.6f}, by hand = {by_hand.item():.6f}, noise levels t = "
      f"{[round(v, 2) for v in t_draw[:, 0].tolist()]}, masked = {masked.sum(1).tolist()} of {L}")
assert abs(loss.item() - by_hand.item()) < 1e-5

# %% [markdown]
# Before training, the model predicts almost uniformly over the 47 tokens other than MASK, so the
# per-masked-token loss $-\log\mu$ is near $\log 47 \approx 3.85$:

# %%
per_token = -(logp * masked).sum() / masked.sum()
print(f"untrained: mean −log μ over masked tokens = {per_token.item():.3f}, "
      f"log 47 = {math.log(47):.3f}")
assert abs(per_token.item() - math.log(47)) < 0.3

# %% [markdown]
# ## 4. Supervised training on sudoku
#
# `sft.train_sft` trains on freshly generated puzzles at every step, with AdamW, warm-up and
# cosine decay, and an EMA of the weights, which is the model that gets evaluated and saved. It uses
# the block layout with the [x ; y ; ỹ] trick above. It prints its config, shows a progress bar, and
# at the end decodes the held-out test puzzles greedily (their solution grids never occur in
# training). With the default settings this takes about a minute on one CPU thread.
# (docs/results.md, "Supervised training", has the default 0.8M-parameter model's scores.)

# %%
if QUICK:
    SFT = dict(d_model=32, n_layers=1, batch_size=32, max_steps=15, warmup_steps=5, eval_n=16)
else:
    SFT = dict(d_model=64, n_layers=3, batch_size=64, max_steps=350, warmup_steps=30, eval_n=200)
sft_cfg = SFTConfig(task="sudoku", layout="block", seed=0, eval_every=0, device="cpu",
                      out_dir=str(OUT / "01_sft"), **SFT)
t0 = time.perf_counter()
metrics = train_sft(sft_cfg)
print(f"SFT: {time.perf_counter() - t0:.0f} s; test exact = {metrics['exact']:.3f}, test reward = "
      f"{metrics['reward']:.3f} on {metrics['n']} puzzles "
      f"(training curves: {OUT / '01_sft' / 'curves.png'})")
model, task = load(str(OUT / "01_sft" / "checkpoint.pt"))  # the EMA weights, as saved
model.eval()

# %% [markdown]
# ## 5. Decoding and the recorded trajectory
#
# `generate` is LLaDA's semi-autoregressive, low-confidence sampler. It starts from x followed by L
# masks and decodes the blocks left to right. Inside a block it takes $T_B$ steps. Each step runs
# the model once, draws a candidate token at every masked position of the block (the argmax at
# temperature 0), and reveals the $k_s$ candidates the model is most confident about. It returns a
# `Trajectory` that records, for every response token, the global step at which it was revealed
# (`unmask_step`) and its log-probability at that moment, `logp_at_reveal`
# $= \log\mu_\theta(y_i \mid x, \tau_t)$. That is enough to rebuild every intermediate state:
# `traj.state(t)`, the state just before step t, masks every token whose `unmask_step` is at least
# t.
#
# One test puzzle, decoded greedily, one token per step ($T_B = b = 4$, so T = 16 steps):

# %%
test_prompts, test_answers = task.test_set(64 if not QUICK else 8)
traj = generate(model, test_prompts, temperature=0.0)  # T_B defaults to the block size
T = traj.num_steps
print(f"puzzle {show(test_prompts[0])}   solution {show(test_answers[0])}")
print(f"{'step':>4} {'block':>5} {'pos':>4} {'token':>5} {'logp_at_reveal':>15}   "
      "response after the step")
for step in range(T):
    pos = (traj.unmask_step[0] == step).nonzero().flatten().tolist()
    toks = "".join(vocab.decode([traj.responses[0, i]]) or "·" for i in pos)
    lps = ", ".join(f"{traj.logp_at_reveal[0, i]:.4f}" for i in pos)
    print(f"{step:>4} {step // traj.steps_per_block:>5} {','.join(map(str, pos)):>4} "
          f"{toks:>5} {lps:>15}   {show(traj.state(step + 1)[0, P:])}")
reward = task.reward(test_prompts[:1], traj.responses[:1]).item()
print(f"final {show(traj.responses[0])}, reward {reward:.3f}; "
      f"Σ logp_at_reveal = {traj.logp_at_reveal[0].sum():.4f}")

# %% [markdown]
# Checks on the whole batch:
# - the states are nested, and every revealed token stays as it is;
# - every block is decoded within its own $T_B$ steps (semi-autoregressive), with $k_s$ tokens per
#   step;
# - `logp_at_reveal` is the log-softmax of a plain, uncached forward pass on `traj.state(t)`, and
#   under low-confidence remasking the revealed token was the most confident masked position of its
#   block.

# %%
def resp_state(t):
    return traj.state(t)[:, P:]  # (B, L) the response part of state τ_t


assert (resp_state(0) == vocab.mask_id).all() and torch.equal(resp_state(T), traj.responses)
schedule = reveal_schedule(traj.block_size, traj.steps_per_block)
block_of = torch.arange(L) // b
assert torch.equal(traj.unmask_step // traj.steps_per_block, block_of.expand_as(traj.unmask_step))
worst = 0.0
with torch.no_grad():
    for step in range(T):
        before, after = resp_state(step), resp_state(step + 1)
        visible = before != vocab.mask_id
        assert torch.equal(before[visible], after[visible])  # revealed tokens never change
        revealed = traj.unmask_step == step  # (B, L)
        assert (revealed.sum(1) == schedule[step % traj.steps_per_block]).all()
        # (B, L, V) uncached, plain block layout
        logp = F.log_softmax(model(traj.state(step))[:, P:], -1)
        conf, argmax = logp.max(-1)  # (B, L) greedy candidate and its log-probability
        assert torch.equal(argmax[revealed], traj.responses[revealed])
        worst = max(worst, (conf[revealed] - traj.logp_at_reveal[revealed]).abs().max().item())
        # candidates
        in_block = (block_of == step // traj.steps_per_block) & (before == vocab.mask_id)
        best = conf.masked_fill(~in_block, -math.inf).max(1).values  # (B,) most confident candidate
        assert ((conf.masked_fill(~revealed, math.inf).min(1).values - best).abs() < 1e-5).all()
print(f"recorded logp_at_reveal vs recomputed log μ_θ: max |Δ| = {worst:.2e}")
assert worst < 1e-5

# %% [markdown]
# Fewer steps per block reveal several tokens per step. That means fewer forward passes, but tokens
# revealed together are drawn independently of each other. Greedy test accuracy for each $T_B$:

# %%
n_eval = len(test_prompts)
for T_B in (4, 2, 1):
    m = evaluate(model, task, test_prompts, steps_per_block=T_B)
    print(f"T_B = {T_B}: {L // b * T_B:2d} forward passes, exact = {m['exact']:.3f}, "
          f"reward = {m['reward']:.3f} ({n_eval} test puzzles)")

# %% [markdown]
# ## 6. The KV cache is exact in the block layout
#
# In the block layout, finished blocks and the prompt never attend to anything later, so their keys
# and values are final once they are decoded. The cached sampler runs only the current block (b
# queries) against the cache, instead of the whole sequence. It must produce exactly the same
# trajectory. We check that at temperature 1 (sampled tokens, same generator seed):

# %%
B = 256 if not QUICK else 16
sample_prompts = task.sample(B, "test", generator=torch.Generator().manual_seed(4))[0]
runs, seconds = {}, {}
for cache in (True, False):
    t0 = time.perf_counter()
    runs[cache] = generate(model, sample_prompts, temperature=1.0,
                           generator=torch.Generator().manual_seed(5), kv_cache=cache)
    seconds[cache] = time.perf_counter() - t0
same_tokens = torch.equal(runs[True].tokens, runs[False].tokens)
same_steps = torch.equal(runs[True].unmask_step, runs[False].unmask_step)
lp_gap = (runs[True].logp_at_reveal - runs[False].logp_at_reveal).abs().max().item()
print(f"cached vs uncached, {B} sampled sequences: same tokens {same_tokens}, "
      f"same unmask_step {same_steps}, max |Δ logp_at_reveal| = {lp_gap:.1e}; "
      f"time {seconds[True]:.2f} s vs {seconds[False]:.2f} s")
assert same_tokens and same_steps and lp_gap < 1e-5

# %% [markdown]
# ## Where to go next
#
# - Tutorial 2 (`02_trajectory_likelihoods.py`): how likely is a response under this model? Exact
#   trajectory log-probabilities, dTRPO's reduced estimator, and the ELBO.
# - Tutorial 3 (`03_policy_optimisation.py`): the RL objectives built on those estimators.
# - Longer training: `python -m minidtrpo sft --task=sudoku`, the task's recipe of 300 steps (see
#   `--help`).
