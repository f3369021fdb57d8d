"""Smoke test of the estimator report (`python -m minidtrpo estimators`) on a tiny freshly trained
checkpoint.

Beyond "it runs": the exact row must be the anchor (zero bias and noise, gradient cosine 1), and the
dTRPO estimate with c = T_B, averaged over many draws, must agree with the exact log-ratio within 4
standard errors (docs/math.md §6 P4 on a real checkpoint, through the report's own bookkeeping).
"""

import json
import math

import pytest

from minidtrpo.__main__ import main
from minidtrpo.sft import SFTConfig, train_sft


@pytest.fixture(scope="module", params=["block", "full"])
def report(request, tmp_path_factory, single_thread):
    layout = request.param
    root = tmp_path_factory.mktemp(f"report_{layout}")
    train_sft(SFTConfig(task="sudoku", layout=layout, d_model=32, n_layers=2, batch_size=16,
                        max_steps=5, warmup_steps=1, eval_every=0, eval_n=8, device="cpu",
                        out_dir=str(root / "sft")))
    out = root / "estimators"
    main(["estimators", f"--ckpt={root / 'sft' / 'checkpoint.pt'}", "--n_prompts=6", "--draws=16",
          "--grad_draws=2", "--perturb=0.05", "--device=cpu", f"--out_dir={out}"])
    return layout, out, json.loads((out / "estimators.json").read_text())


def test_report_files_and_rows(report):
    layout, out, data = report
    names = ["exact trajectory", "exact + log S_t", "ELBO n=1", "ELBO n=4", "ELBO n=16",
             "ELBO n=4, trajectory masks", "one-step p=0.15"]
    names += (["dTRPO c=T_B", "dial K=2, c=T_B/2, 1 pass"] if layout == "block"
              else ["dTRPO c=T_B, 1 pass", "dTRPO c=T_B, N_B passes", "ELBO n=16, blockwise",
                    "dial K=2, c=T_B/2, N_B·K passes"])
    names += ["dial K=2 stratified"]  # T_B = b = 4: K ∈ {1, 2, T_B/2} is K = 1 and 2
    table = (out / "estimators.md").read_text()
    rows = [line for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| estimator")]
    # one row per estimator, no more
    assert sorted(line.split(" | ")[0][2:] for line in rows) == sorted(names)
    assert sorted(r["name"] for r in data["estimators"]) == sorted(names)
    assert (out / "estimators.png").stat().st_size > 10_000
    for r in data["estimators"]:
        for key in ("bias", "std", "corr", "grad_cos", "fwd_ms", "fwd_bwd_ms", "saved_mb"):
            assert math.isfinite(r[key]), (r["name"], key)
        assert r["passes_per_response"] >= 1 and r["saved_mb"] > 0
    # BGPO's default masks: one [x ; y ; ỹ] row per sample in either layout
    visited = next(r for r in data["estimators"] if r["name"] == "ELBO n=4, trajectory masks")
    assert visited["passes_per_response"] == 4
    # docs/math.md §4.3: n_mc = T_B = 4 stratified steps are the 4 within-block steps, each once,
    # so every draw is the same in the block layout; over the full layout's T = 16 steps they vary
    if layout == "block":
        assert visited["std"] < 1e-6
    else:
        assert visited["std"] > 1e-4
    # the dial at K = 2: one pass of P + 3L tokens (block), N_B·K = 8 true states (full); the
    # noise of dTRPO's K = 1 row falls
    dial = next(r for r in data["estimators"] if r["name"].startswith("dial K=2, c"))
    k1 = "dTRPO c=T_B" if layout == "block" else "dTRPO c=T_B, N_B passes"  # exact states
    one = next(r for r in data["estimators"] if r["name"] == k1)
    assert (dial["passes_per_response"], dial["tokens_per_pass"]) == \
        ((1, 16 + 3 * 16) if layout == "block" else (8, 32))
    assert dial["std"] < one["std"]


def test_exact_row_is_the_anchor(report):
    _, _, data = report
    exact = next(r for r in data["estimators"] if r["name"] == "exact trajectory")
    assert abs(exact["bias"]) < 1e-6 and exact["std"] < 1e-6
    assert exact["grad_cos"] == pytest.approx(1.0, abs=1e-5)
    assert exact["corr"] == pytest.approx(1.0, abs=1e-6)
    # T_B or T passes
    assert exact["passes_per_response"] == (4 if data["setup"]["layout"] == "block" else 16)


def test_dtrpo_mean_over_draws_matches_exact(report):
    """E_s[D̂] = Δ with c = T_B: over 16 draws the mean agrees with the exact log-ratio overall (4
    standard errors) and per trajectory (mean squared z-score ≈ 1); the same statistic for c = 1 is
    far off (measured: ~1 against ~100-200), so the check has power. Full layout: the exact N_B-pass
    variant."""
    layout, _, data = report
    name = "dTRPO c=T_B" if layout == "block" else "dTRPO c=T_B, N_B passes"
    d = next(r for r in data["estimators"] if r["name"] == name)
    delta = data["delta"]
    K, T_B = d["draws"], data["setup"]["block_size"]  # one token per step: T_B = b
    assert abs(d["bias"]) < 4 * d["bias_se"]
    # per trajectory: z_i = (mean over draws − Δ_i) / standard error; mean z_i² ≈ 1 when
    # E_s[D̂_i] = Δ_i
    per = d["per_trajectory"]
    se = [max(s / math.sqrt(K), 1e-9) for s in per["std"]]
    z2 = [((m - t) / e) ** 2 for m, t, e in zip(per["mean"], delta, se)]
    assert sum(z2) / len(z2) < 4
    # the same statistic for c = 1 (estimates and their noise divided by T_B) must be far off: the
    # check has power
    z2_c1 = [((m / T_B - t) / (e / T_B)) ** 2 for m, t, e in zip(per["mean"], delta, se)]
    assert sum(z2_c1) / len(z2_c1) > 16
