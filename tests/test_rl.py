"""RL, preference and head-to-head runs (rl.py, updates.py, preference.py, compare.py).

Smoke runs of every objective and estimator through the command line on a tiny checkpoint; exact
resume (an interrupted run, resumed, writes the same metrics as an uninterrupted one); bad options
exit with 2; the measured activation memory of BGPO is flat in n_mc while the exp-of-mean
baseline's grows; the two-pass exp-of-mean update moves the weights as the one-graph one does; and
the flat-memory exact-trajectory DPO gradient equals plain autograd's (float64).
"""

import copy
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

import minidtrpo.igpo as igpo_module
import minidtrpo.rl as rl_module
import minidtrpo.train as train_module
import minidtrpo.updates as updates_module
from conftest import perturbed, random_prompts, tiny_model
from minidtrpo.__main__ import main
from minidtrpo.compare import interval, reusable, stops_alike
from minidtrpo.config import BadInput
from minidtrpo.estimators import reduced_trajectory_logprob, trajectory_logprob
from minidtrpo.meters import Meters
from minidtrpo.objectives import dpo_loss
from minidtrpo.preference import dpo_full_trajectory
from minidtrpo.rl import OBJECTIVES, RLConfig
from minidtrpo.sampling import Trajectory, generate
from minidtrpo.sft import SFTConfig, train_sft
from minidtrpo.train import load

pytestmark = pytest.mark.usefixtures("single_thread")
TIMING = {"train_seconds", "rollout_s", "update_s", "rss_mb", "cuda_peak_mb"}  # differ between runs
TINY_RL = ["--num_prompts=4", "--num_generations=4", "--n_mc=2", "--eval_n=8", "--device=cpu",
           "--kl_rollouts=4"]
TINY_DPO = ["--batch_size=4", "--n_mc=2", "--eval_n=8", "--device=cpu"]


@pytest.fixture(scope="module")
def made(tmp_path_factory, single_thread):
    """Tiny checkpoints and pairs files, made once per module and layout."""
    cache = {}

    def make(what, layout):
        if (what, layout) not in cache:
            out = tmp_path_factory.mktemp(f"{what}_{layout}")
            # a barely trained sudoku model: its rollouts disagree, so groups carry signal
            if what == "ckpt":
                train_sft(SFTConfig(task="sudoku", layout=layout, d_model=32, n_layers=2,
                                    max_steps=3, batch_size=16, eval_n=8, device="cpu",
                                    out_dir=str(out)))
                cache[what, layout] = str(out / "checkpoint.pt")
            else:
                cache[what, layout] = str(out / "pairs.pt")
                main(["pairs", f"--init={make('ckpt', layout)}", "--num_prompts=16",
                      "--num_generations=4", "--device=cpu", f"--out={cache[what, layout]}"])
        return cache[what, layout]

    return make


@pytest.fixture(params=["full", "block"])
def layout(request):
    return request.param


@pytest.fixture
def ckpt(made, layout):
    return made("ckpt", layout)


@pytest.fixture
def pairs(made, layout):
    return made("pairs", layout)


@pytest.fixture
def full_ckpt(made):
    return made("ckpt", "full")


@pytest.fixture
def full_pairs(made):
    return made("pairs", "full")


@pytest.fixture(autouse=True)
def no_plots(request, monkeypatch):
    """matplotlib costs ~0.5 s a figure on a busy 2-core machine: only the smoke test of `rl` draws
    one."""
    if request.node.originalname != "test_rl_runs_every_objective":
        monkeypatch.setattr(train_module, "plot_run", lambda *args: None)


def rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def untimed(lines):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in lines]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_rl_runs_every_objective(ckpt, objective, tmp_path):
    main(["rl", f"--init={ckpt}", f"--objective={objective}", "--max_iters=2", "--eval_every=1",
          f"--out_dir={tmp_path}", *TINY_RL])
    lines = rows(tmp_path)
    evals, iters = ([r for r in lines if "test_exact" in r],
                    [r for r in lines if "test_exact" not in r])
    assert [r["iter"] for r in evals] == [0, 1, 2] and [r["iter"] for r in iters] == [1, 2]
    for key in ("reward_mean", "reward_std", "exact", "zero_adv_frac", "nll_revealed", "kl_ref",
                "entropy_revealed", "rollout_s", "update_s", "passes_per_response",
                "peak_saved_mb"):
        assert all(key in r for r in iters), key
    # the health panel's metrics where the update ran: the clip for the clipped objectives
    ran = [r for r in iters if r["update_s"] > 0]
    assert all("grad_norm" in r for r in ran)
    if objective in ("full_trajectory", "diffu_grpo", "dtrpo"):
        assert all("clip_frac" in r for r in ran)
    assert all(0 < r["entropy_revealed"] < math.log(48) for r in iters)
    assert any(r["update_s"] > 0 for r in iters)  # at least one update ran (groups with signal)
    for name in ("config.json", "checkpoint.pt", "curves.png"):
        assert os.path.exists(tmp_path / name)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["config"]["objective"] == objective and state["iter"] == 2 and state["finished"]
    load(str(tmp_path / "checkpoint.pt"))  # an RL checkpoint is a model checkpoint like any other


@pytest.mark.parametrize("objective", ["full_trajectory", "diffu_grpo"])
def test_rl_kl_off_policy_and_step_ratio(full_ckpt, objective, tmp_path):
    main(["rl", f"--init={full_ckpt}", f"--objective={objective}", "--ratio_level=step",
          "--beta=0.1", "--num_iterations=2", "--remasking=random", "--steps_per_block=2",
          "--max_iters=1", f"--out_dir={tmp_path}", *TINY_RL])
    it = [r for r in rows(tmp_path) if "test_exact" not in r][0]
    assert "kl" in it and "clip_frac" in it


@pytest.mark.parametrize("argv", [["--nope=1"], ["--objective=ppo"], ["--lr=fast"],
                                  ["--objective=bgpo", "--beta=0.1"],
                                  ["--objective=bgpo", "--position_term=true"],
                                  ["--igpo=0.5", "--igpo_hint_min=0.7", "--igpo_hint_max=0.3"],
                                  ["--igpo=1.5"], ["--remasking=threshold", "--steps_per_block=2"],
                                  ["--remasking=credit", "--schedule=ascending"],
                                  ["--schedule=ascending", "--steps_per_block=2"],
                                  ["--schedule=fast"], ["--threshold=1.5"], ["--eos_factor=0"]])
def test_rl_bad_options_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        main(["rl", *argv])
    assert e.value.code == 2


@pytest.mark.parametrize("estimator", ["dtrpo", "full_trajectory", "vrpo"])
def test_pairs_and_dpo_every_estimator(ckpt, pairs, estimator, tmp_path):
    data = torch.load(pairs, weights_only=True)  # plain tensors, numbers and strings
    # chosen strictly better than rejected
    assert (data["rewards"][:, 0] > data["rewards"][:, 1]).all()
    chosen = Trajectory(**data["chosen"])
    assert len(chosen.tokens) == data["summary"]["pairs"] > 0
    main(["dpo", f"--init={ckpt}", f"--pairs={pairs}", f"--estimator={estimator}",
          "--max_iters=2", "--eval_every=1", f"--out_dir={tmp_path}", *TINY_DPO])
    iters = [r for r in rows(tmp_path) if "test_exact" not in r]
    assert len(iters) == 2 and all(r["update_s"] > 0 and "reward_accuracy" in r for r in iters)
    # the health panel: KL to the start (after the step), entropy where the reference revealed
    assert all("grad_norm" in r and 0 < r["entropy_revealed"] < math.log(48)
               and math.isfinite(r["kl_ref"]) for r in iters)
    # at θ = ref the loss is log 2 (P10); exact DPO reads the reference from the recorded trajectory
    assert abs(iters[0]["loss"] - 0.6931471805599453) < 1e-4


def test_dpo_forced_single_pass_in_full_layout_starts_at_log_2(full_ckpt, full_pairs, tmp_path):
    """Full layout, --single_pass=true: policy and reference are scored by the same approximate
    pass, so D = 0 at θ = ref and the first loss is log 2 (P10), not biased by the record's true
    states."""
    main(["dpo", f"--init={full_ckpt}", f"--pairs={full_pairs}", "--single_pass=true",
          "--max_iters=1", "--eval_every=0", f"--out_dir={tmp_path}", *TINY_DPO])
    first = [r for r in rows(tmp_path) if "test_exact" not in r][0]
    assert abs(first["loss"] - 0.6931471805599453) < 1e-5


def test_dpo_rejects_pairs_of_another_model(full_ckpt, full_pairs, tmp_path):
    other = str(tmp_path / "other.pt")
    state = torch.load(full_ckpt, weights_only=True)
    state["model"] = {k: v + 0.01 for k, v in state["model"].items()}
    torch.save(state, other)
    with pytest.raises(SystemExit) as e:
        main(["dpo", f"--init={other}", f"--pairs={full_pairs}", f"--out_dir={tmp_path}",
              *TINY_DPO])
    assert e.value.code == 2


@pytest.mark.parametrize("min_lr_ratio", ["1", "0.25"])
def test_rl_resume_is_exact_even_after_ctrl_c(full_ckpt, tmp_path, monkeypatch, min_lr_ratio):
    """4 iterations straight == Ctrl-C during iteration 3, resume to 4; at a constant rate also
    == 2, stop, resume to 4 (with a decay, a run of 2 has a schedule of its own)."""
    argv = ["rl", f"--init={full_ckpt}", "--objective=bgpo", "--eval_every=2",
            f"--min_lr_ratio={min_lr_ratio}", *TINY_RL]
    main([*argv, "--max_iters=4", f"--out_dir={tmp_path / 'a'}"])
    main([*argv, "--max_iters=2", f"--out_dir={tmp_path / 'b'}"])
    main([*argv, "--max_iters=4", f"--out_dir={tmp_path / 'b'}", "--resume"])
    calls, real = [], rl_module.rollout

    def interrupting(*args, **kw):  # Ctrl-C in the rollout of the third iteration
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(rl_module, "rollout", interrupting)
    with pytest.raises(SystemExit) as e:
        main([*argv, "--max_iters=4", f"--out_dir={tmp_path / 'c'}"])
    assert (e.value.code == 130
            and torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)["iter"] == 2)
    monkeypatch.setattr(rl_module, "rollout", real)
    main([*argv, "--max_iters=4", f"--out_dir={tmp_path / 'c'}", "--resume"])
    a = untimed(rows(tmp_path / "a"))
    assert len(a) == 4 + 3 and a == untimed(rows(tmp_path / "c"))
    assert (a == untimed(rows(tmp_path / "b"))) == (min_lr_ratio == "1")


def test_dpo_resume_is_exact(full_ckpt, full_pairs, tmp_path):
    argv = ["dpo", f"--init={full_ckpt}", f"--pairs={full_pairs}", "--estimator=dtrpo",
            "--eval_every=2", *TINY_DPO]
    main([*argv, "--max_iters=5", f"--out_dir={tmp_path / 'a'}"])  # crosses an epoch boundary
    main([*argv, "--max_iters=2", f"--out_dir={tmp_path / 'b'}"])
    main([*argv, "--max_iters=5", f"--out_dir={tmp_path / 'b'}", "--resume"])
    assert untimed(rows(tmp_path / "a")) == untimed(rows(tmp_path / "b"))


def test_bgpo_memory_flat_in_n_mc_vrpo_grows(full_ckpt, tmp_path):
    """Issue 4: bgpo at n_mc=16 within 1.2x of n_mc=1 (activation bytes of the update); vrpo_ol
    grows."""
    peak = {}
    for objective in ("bgpo", "vrpo_ol"):
        for n in (1, 16):
            out = tmp_path / f"{objective}{n}"
            main(["rl", f"--init={full_ckpt}", f"--objective={objective}", "--max_iters=1",
                  "--eval_every=0", f"--out_dir={out}", *TINY_RL, f"--n_mc={n}"])
            peak[objective, n] = [r for r in rows(out) if "peak_saved_mb" in r][0]["peak_saved_mb"]
    assert peak["bgpo", 16] <= 1.2 * peak["bgpo", 1]
    assert peak["vrpo_ol", 16] > 8 * peak["vrpo_ol", 1]


def test_vrpo_two_pass_update_equals_one_graph_update():
    """vrpo_ol with vrpo_two_pass: three optimizer steps on one batch (the last two off-policy, with
    the clip binding) leave the weights the one-graph update leaves (float64). Forward rows per
    response: n for the old values, then n per step for bgpo and the one-graph form; the two-pass
    form adds n no-grad rows to every step but the first (whose θ is θ_old)."""
    model, G, n, mu = tiny_model("block"), 4, 3, 3
    traj = generate(model, random_prompts(2).repeat_interleave(G, 0), temperature=1.0,
                    generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -1.0, -0.5, -0.5], dtype=torch.float64)
    weights, rows = {}, {}
    for name, objective, two_pass, eps in (("one graph", "vrpo_ol", False, 0.1),
                                           ("two pass", "vrpo_ol", True, 0.1),
                                           ("unclipped", "vrpo_ol", False, 100.0),
                                           ("bgpo", "bgpo", False, 0.1)):
        policy = copy.deepcopy(model)
        opt = torch.optim.SGD(policy.parameters(), lr=0.1)
        cfg = RLConfig(objective=objective, num_generations=G, n_mc=n, num_iterations=mu,
                       clip_eps=eps, vrpo_two_pass=two_pass)

        def step():
            opt.step()
            opt.zero_grad()

        with Meters(torch.device("cpu"), policy) as meters:
            updates_module.UPDATES[objective](cfg, policy, None, traj, adv,
                                              torch.Generator().manual_seed(0), step)
        weights[name] = torch.cat([p.detach().flatten() for p in policy.parameters()])
        rows[name] = meters.rows / len(adv)
    torch.testing.assert_close(weights["two pass"], weights["one graph"], rtol=1e-10, atol=1e-12)
    # the premise: the clip changed the update (it binds off-policy)
    assert (weights["one graph"] - weights["unclipped"]).abs().max() > 1e-3
    assert rows == {"one graph": (1 + mu) * n, "unclipped": (1 + mu) * n, "bgpo": (1 + mu) * n,
                    "two pass": (1 + mu) * n + (mu - 1) * n}


def test_compare_in_process(full_ckpt, tmp_path):
    main(["compare", f"--init={full_ckpt}", "--budget=0.3", "--objectives=diffu_grpo,dpo_dtrpo",
          "--seeds=0,1", "--eval_n=8", "--eval_every_s=0.1",
          "--rl_args=num_prompts=4,num_generations=4,kl_rollouts=0,min_lr_ratio=1",
          "--pairs_args=num_prompts=16,num_generations=4", "--dpo_args=batch_size=4",
          "--lr_overrides=diffu_grpo=1e-5", "--subprocess=false", "--device=cpu",
          f"--out_dir={tmp_path}"])
    text = open(tmp_path / "compare.md").read()
    assert ("| diffu_grpo | 2 |" in text and "| dpo_dtrpo | 2 |" in text and " ± " in text
            and os.path.exists(tmp_path / "compare.png"))
    assert f"--init={full_ckpt}" in text and "--task=" not in text  # the start's task rules
    assert json.load(open(tmp_path / "diffu_grpo" / "seed1" / "config.json"))["lr"] == 1e-5
    with pytest.raises(SystemExit) as e:
        main(["compare", f"--init={full_ckpt}", "--objectives=grpo", f"--out_dir={tmp_path}"])
    assert e.value.code == 2
    # a finished run is reused; another value of an option is another run; a run saved by
    # another version of minidtrpo (here: without elbo_masks) is refused
    folder = tmp_path / "diffu_grpo" / "seed0"
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    cfg = RLConfig(**state["config"])
    assert reusable(str(folder), cfg) == "done"
    assert reusable(str(folder), RLConfig(**{**state["config"], "elbo_masks": "uniform"})) == "new"
    assert reusable(str(folder), RLConfig(**{**state["config"], "min_lr_ratio": 0.1})) == "new"
    del state["config"]["elbo_masks"]
    torch.save(state, folder / "checkpoint.pt")
    with pytest.raises(BadInput, match="saved by another version of minidtrpo"):
        reusable(str(folder), cfg)
    state["config"]["elbo_masks"] = cfg.elbo_masks
    torch.save(state, folder / "checkpoint.pt")
    # the same training run asked for with another evaluation cadence and an iteration limit it
    # never reached is reused; a longer time budget (this run stopped on its 0.3 s) is not
    saved = dict(vars(cfg))  # the options the run trained with
    assert state["iter"] < 1000 and state["train_seconds"] >= saved["time_budget"]
    alike = {**saved, "eval_every": 3, "eval_every_s": 7.0, "max_iters": 1000}
    assert reusable(str(folder), RLConfig(**alike)) == "done"
    assert reusable(str(folder), RLConfig(**{**alike, "time_budget": 100.0})) == "new"
    assert reusable(str(folder), RLConfig(**{**alike, "max_iters": state["iter"] - 1})) == "new"


@pytest.mark.slow
def test_compare_subprocess_trains_its_own_start(tmp_path):
    main(["compare", "--sft_budget=2", "--sft_args=d_model=32,n_layers=2,batch_size=16",
          "--budget=1", "--objectives=bgpo,dpo_full_trajectory", "--seeds=0", "--eval_n=8",
          "--eval_every_s=0.5", "--rl_args=num_prompts=4,num_generations=4,n_mc=2",
          "--pairs_args=num_prompts=16,num_generations=4", "--dpo_args=batch_size=4",
          "--device=cpu", f"--out_dir={tmp_path}"])
    assert (os.path.exists(tmp_path / "sft" / "checkpoint.pt")
            and os.path.exists(tmp_path / "compare.png"))


# --------------------------------------------------------------------------------------------------
# The flat-memory exact-trajectory DPO gradient (docs/math.md §5.3) against plain autograd


def test_flat_memory_exact_dpo_equals_autograd(layout):
    ref = tiny_model(layout)
    policy = perturbed(ref, scale=0.05)
    gen = torch.Generator().manual_seed(0)
    both = generate(ref, random_prompts(8, seed=3), steps_per_block=2, temperature=1.0,
                    generator=gen)  # 4 pairs
    # the identity the flat backward uses: log π(τ) = Σ_s (reduced log-prob with every block at
    # step s)
    n_blocks = both.num_blocks
    by_step = sum(reduced_trajectory_logprob(policy, both, torch.full((8, n_blocks), s),
                                             single_pass=layout == "block")
                  for s in range(both.steps_per_block))
    torch.testing.assert_close(by_step, trajectory_logprob(policy, both), rtol=1e-10, atol=1e-10)
    grads = {}
    for flat in (True, False):
        policy.zero_grad()
        stats = dpo_full_trajectory(SimpleNamespace(beta=0.7, flat_memory=flat), policy, ref, both,
                                    None)
        grads[flat] = [p.grad.clone() for p in policy.parameters()]
    # the reference: DPO on the exact log-ratio with the reference scored by the estimator itself
    policy.zero_grad()
    d = trajectory_logprob(policy, both) - trajectory_logprob(ref, both).detach()
    loss, _ = dpo_loss(d[:4], d[4:], 0.7)
    loss.backward()
    assert abs(stats["loss"] - loss.item()) < 1e-8
    for g_flat, g_plain, p in zip(grads[True], grads[False], policy.parameters()):
        torch.testing.assert_close(g_flat, g_plain, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(g_flat, p.grad, rtol=1e-6, atol=1e-10)


def test_compare_interval_is_the_t_interval_of_the_mean():
    """[1, 2, 3]: mean 2, sample std 1, t_{0.975, 2} = 4.303, so the half-width is 4.303 / √3."""
    assert abs(interval([1.0, 2.0, 3.0]) - 4.303 / 3 ** 0.5) < 1e-12
    assert interval([5.0]) != interval([5.0])  # one seed: no interval (NaN)


def test_compare_reuses_a_run_only_where_it_would_stop_alike():
    """Runs made by `rl` (max_iters 1000, time budget 600) and `dpo` (no time budget, ended by its
    epochs), asked for again with a higher iteration limit, are the same training runs."""
    rl_run = {"max_iters": 1000, "time_budget": 600.0}
    asked = {"max_iters": 100_000, "time_budget": 600.0}
    assert stops_alike(rl_run, asked, it=110, seconds=604.2)  # both stop on the 600 s
    assert not stops_alike(rl_run, {**asked, "time_budget": 900.0}, it=110, seconds=604.2)
    assert not stops_alike(rl_run, {**asked, "time_budget": 300.0}, it=110, seconds=604.2)
    assert not stops_alike(rl_run, {**asked, "max_iters": 50}, it=110, seconds=604.2)
    dpo_run = {"max_iters": 100_000, "time_budget": 0.0}  # ended by epochs, a shared option
    assert stops_alike(dpo_run, asked, it=2530, seconds=185.0)
    assert not stops_alike(dpo_run, {**asked, "time_budget": 100.0}, it=2530, seconds=185.0)
    capped = {"max_iters": 200, "time_budget": 0.0}  # stopped on its own iteration limit
    assert not stops_alike(capped, asked, it=200, seconds=20.0)


def test_rl_warmup_ramps_the_learning_rate(full_ckpt, tmp_path):
    main(["rl", f"--init={full_ckpt}", "--objective=diffu_grpo", "--lr=3e-4", "--warmup_iters=3",
          "--min_lr_ratio=1", "--max_iters=4", "--eval_every=0", f"--out_dir={tmp_path}", *TINY_RL])
    lrs = [r["lr"] for r in rows(tmp_path) if "test_exact" not in r]
    assert lrs == pytest.approx([1e-4, 2e-4, 3e-4, 3e-4])  # lr · (it + 1) / 3, then lr


def test_rl_cosine_decay_ends_at_min_lr_ratio(full_ckpt, tmp_path):
    main(["rl", f"--init={full_ckpt}", "--objective=diffu_grpo", "--lr=4e-4", "--min_lr_ratio=0.25",
          "--max_iters=3", "--eval_every=0", f"--out_dir={tmp_path}", *TINY_RL])
    lrs = [r["lr"] for r in rows(tmp_path) if "test_exact" not in r]
    # lr · (r + (1 − r) · (1 + cos(π · it / 3)) / 2) at it = 0, 1, 2
    assert lrs == pytest.approx([4e-4, 3.25e-4, 1.75e-4])


@pytest.mark.parametrize("layout", ["block", "full"])
def test_group_masks_cancel_what_a_group_shares(layout):
    """group_masks: the G responses of a prompt get one set of ELBO masks (docs/math.md §5.4). In
    a group of identical responses with advantages summing to 0, Σ_i A_i ∇ℓ_i then cancels
    exactly; with a set of masks per response it does not (that noise is what sharing removes)."""
    model, G = tiny_model(layout), 4
    prompts = random_prompts(2).repeat_interleave(G, 0)  # (p g): groups contiguous
    traj = generate(model, prompts)  # greedy: every response of a group is the same
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -1.0, -0.5, -0.5], dtype=torch.float64)
    norms = {}
    for shared in (True, False):
        cfg = RLConfig(objective="bgpo", num_generations=G, n_mc=3, group_masks=shared,
                       elbo_masks="uniform")
        masks, _ = updates_module._elbo_setup(cfg, model, traj,
                                              torch.Generator().manual_seed(0))
        groups = masks.view(2, G, 3, -1)
        assert (groups == groups[:, :1]).all() == shared  # equal within each group iff shared
        model.zero_grad()
        updates_module.update_bgpo(cfg, model, None, traj, adv, torch.Generator().manual_seed(0),
                                   lambda: None)
        norms[shared] = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert norms[True] < 1e-12 < 1e-3 < norms[False]


@pytest.mark.parametrize("score_hints", [True, False])
def test_igpo_replaces_an_all_wrong_groups_first_responses_with_hinted_correct_ones(full_ckpt,
                                                                                    score_hints):
    """IGPO: a barely trained model gets every puzzle wrong; with every chunk given as a hint the
    decoded responses are the answers, so ⌊igpo·G⌋ of each group's responses are replaced by the
    answer and the others are left as they were. Scored hints are recorded as revealed at their
    block's first step, with the terms of that trajectory (P1 holds for it)."""
    policy, task = load(full_ckpt, "cpu")
    cfg = RLConfig(init=full_ckpt, num_generations=4, igpo=0.5, igpo_hint_min=1.0,
                   igpo_hint_max=1.0, igpo_score_hints=score_hints, device="cpu")
    prompts, answers = task.sample(3, "train", generator=torch.Generator().manual_seed(0))
    prompts, answers = prompts.repeat_interleave(4, 0), answers.repeat_interleave(4, 0)
    gens = {"prompts": torch.Generator().manual_seed(1),
            "rollout": torch.Generator().manual_seed(2)}
    traj, rewards, exact = train_module.rollout(policy, task, prompts, temperature=1.0,
                                                generator=gens["rollout"])
    assert not exact.any()  # the premise: every group is all wrong
    before = traj.responses.clone()
    stats = igpo_module.inpaint(cfg, policy, task, traj, rewards, exact, answers, gens)
    assert stats == {"igpo_groups": 3, "igpo_replaced": 6}
    replaced = torch.tensor([1, 1, 0, 0] * 3, dtype=torch.bool)  # ⌊0.5·4⌋ = 2 per group
    assert exact.equal(replaced) and (rewards[replaced] == 1).all()
    assert torch.equal(traj.responses[replaced], answers[replaced])
    assert torch.equal(traj.responses[~replaced], before[~replaced])
    hinted = traj.index(replaced)
    if score_hints:  # every token a hint, each "revealed" at its block's first step
        first = torch.arange(hinted.responses.shape[1]) // hinted.block_size * \
            hinted.steps_per_block
        assert (hinted.unmask_step == first).all()
        torch.testing.assert_close(trajectory_logprob(policy, hinted),
                                   hinted.logp_at_reveal.sum(1), rtol=0, atol=1e-5)
        assert (hinted.logp_at_reveal.sum(1) < 0).all()
    else:  # context only: nothing decoded, nothing scored
        assert (hinted.unmask_step == -1).all() and (hinted.logp_at_reveal == 0).all()


def test_rl_igpo_and_position_term_run(full_ckpt, tmp_path):
    """The IGPO and selection-term options run end to end and log what they did."""
    main(["rl", f"--init={full_ckpt}", *TINY_RL, "--max_iters=2", "--igpo=0.5",
          "--position_term=true", f"--out_dir={tmp_path}"])
    lines = [r for r in rows(tmp_path) if "igpo_groups" in r]
    assert len(lines) == 2 and all(0 <= r["igpo_replaced"] <= 2 * r["igpo_groups"] for r in lines)


@pytest.mark.parametrize("decoding", [["--schedule=ascending", "--eos_factor=0.2"],
                                      ["--remasking=credit", "--threshold=0.5", "--igpo=0.5"]])
def test_rl_and_pairs_take_the_decoding_options(made, decoding, tmp_path):
    """CJ-GRPO is `rl --ratio_level=step --schedule=ascending`; the parallel rules (here with IGPO's
    inpainted rollouts, decoded apart and renumbered to one T_B) run through rl and pairs too."""
    ckpt = made("ckpt", "block")
    main(["rl", f"--init={ckpt}", *TINY_RL, "--max_iters=2", "--ratio_level=step", *decoding,
          f"--out_dir={tmp_path / 'rl'}"])
    assert len([r for r in rows(tmp_path / "rl") if "test_exact" not in r]) == 2
    main(["pairs", f"--init={ckpt}", "--num_prompts=8", "--num_generations=4", "--device=cpu",
          *[d for d in decoding if "igpo" not in d], f"--out={tmp_path / 'pairs.pt'}"])
    saved = torch.load(tmp_path / "pairs.pt", weights_only=True)
    assert saved["config"]["schedule"] in ("uniform", "ascending")


def test_the_dial_at_every_step_trains_as_the_exact_trajectory(layout):
    """dpo --estimator=dtrpo and rl --objective=dtrpo with steps_scored = T_B (c = 1, every step of
    every block) take the gradient of the exact-trajectory DPO and online updates (P17 in training),
    and with K = 1 a different one."""
    from minidtrpo.preference import DPOConfig, dpo_dtrpo
    from minidtrpo.updates import UPDATES
    ref = tiny_model(layout)
    policy = perturbed(ref, scale=0.05)
    both = generate(ref, random_prompts(8, seed=3), steps_per_block=2, temperature=1.0,
                    generator=torch.Generator().manual_seed(0))
    adv = torch.linspace(-1, 1, 8, dtype=torch.float64)

    def grad_of(update):
        policy.zero_grad()
        update()
        return torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])

    gen = torch.Generator().manual_seed(1)
    dpo = {k: grad_of(lambda: dpo_dtrpo(DPOConfig(estimator="dtrpo", steps_scored=k, beta=0.7),
                                        policy, ref, both, gen)) for k in (1, 2)}
    exact = grad_of(lambda: dpo_full_trajectory(SimpleNamespace(beta=0.7, flat_memory=False),
                                                policy, ref, both, None))
    torch.testing.assert_close(dpo[2], exact, rtol=1e-8, atol=1e-10)
    assert (dpo[1] - exact).norm() > 1e-3 * exact.norm()
    online = {}
    for name, k in (("dtrpo", 2), ("full_trajectory", 2)):
        cfg = RLConfig(objective=name, steps_scored=k)
        online[name] = grad_of(lambda: UPDATES[name](cfg, policy, ref, both, adv, gen,
                                                     step=lambda: None))
    torch.testing.assert_close(online["dtrpo"], online["full_trajectory"], rtol=1e-8, atol=1e-10)
