"""engine.sweep on a tiny config: tables, figures and results.json; shared runs run once; finished runs reused."""

import json
import os
import subprocess
import sys

import pytest

import atesd.engine.sweep as sweep
import atesd.engine.sweep_report as report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG = b"\x89PNG\r\n\x1a\n"


def _argv(out, model_dir, *extra, alphas="0,1"):
    return [
        "--out", str(out), "--alphas", alphas, "--seeds", "0", "--methods", "full,adaptive", "--steps", "2",
        "--batch-size", "2", "--eval-problems", "4", "--threads", "1", "--jobs", "1", *extra,
        "--", "--model", model_dir, "--data", "lab", "--task-option", "size=40", "--max-new-tokens", "8",
        "--eval-max-new-tokens", "8", "--probe-every", "0",
    ]  # fmt: skip


def _mtimes(out):
    return {d: os.path.getmtime(os.path.join(out, d, "summary.json")) for d in os.listdir(out) if "-seed" in d}


def test_sweep_tables_figures_and_reuse(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "sw"
    res = sweep.main(_argv(out, tiny_model_dir, "--jobs", "2"))
    # full == fixed:1 is shared by both parts: three runs, not four
    assert sorted(d for d in os.listdir(out) if "-seed" in d) == ["adaptive-seed0", "fixed_0-seed0", "fixed_1-seed0"]
    assert set(res["runs"]) == {"fixed:0/seed0", "fixed:1/seed0", "adaptive/seed0"}
    for name in ("fig_mismatch_vs_alpha.png", "fig_accuracy_vs_alpha.png", "fig_methods.png"):
        with open(out / name, "rb") as fh:
            assert fh.read(8) == PNG
    with open(out / "results.json") as fh:
        saved = json.load(fh)
    assert saved["fixed_exposure"] == res["fixed_exposure"] and saved["runs"].keys() == res["runs"].keys()

    for run in res["runs"].values():
        assert "error" not in run, run
        # the summary's mean KL is the token-weighted mean of the run's metrics
        with open(os.path.join(run["run_dir"], "metrics.jsonl")) as fh:
            rows = [json.loads(ln) for ln in fh]
        tokens = sum(r["rollout_tokens"] for r in rows)
        assert run["kl_mean"] == pytest.approx(sum(r["kl"] * r["rollout_tokens"] for r in rows) / tokens)
        assert run["top1_disagree_mean"] == pytest.approx(1 - run["top1_agree_mean"])
        assert run["gain"] == pytest.approx(run["accuracy_after"] - run["accuracy_before"])
        assert 0 <= run["accuracy_after"] <= 1 and run["steps"] == 2 and len(rows) == 2
    alphas = {rid: res["runs"][rid]["alpha_mean"] for rid in ("fixed:0/seed0", "fixed:1/seed0")}
    assert alphas == {"fixed:0/seed0": 0.0, "fixed:1/seed0": 1.0}

    rows = {r["alpha"]: r for r in res["fixed_exposure"]}
    assert set(rows) == {0.0, 1.0}
    for a, r in rows.items():
        run = res["runs"][f"fixed:{a:g}/seed0"]
        assert r["runs"] == 1 and r["kl_mean"] == run["kl_mean"] and r["kl_mean_ci"] is None
        assert r["top1_disagree_mean"] == run["top1_disagree_mean"] and r["gain"] == run["gain"]
    methods = {r["method"]: r for r in res["method_comparison"]}
    assert methods["full"]["accuracy_after"] == rows[1.0]["accuracy_after"]
    assert methods["adaptive"]["accuracy_after_per_seed"] == {"0": res["runs"]["adaptive/seed0"]["accuracy_after"]}
    # one seed: no interval, but the paired tables are there (t undefined with one pair)
    comp = res["paired_tests"]
    assert [(r["from"], r["to"]) for r in comp["monotone"]] == [(0.0, 1.0)]
    assert comp["monotone"][0]["kl_mean"]["n"] == 1 and comp["monotone"][0]["kl_mean"]["t"] is None
    assert [r["b"] for r in comp["methods"]][0] == "full" and comp["methods"][0]["a"] == "adaptive"
    assert comp["methods"][-1]["b"].startswith("best fixed")

    md = (out / "sweep.md").read_text()
    assert "## Fixed exposure" in md and "## Methods" in md and "### Paired comparisons" in md
    assert "### Mismatch grows with alpha" in md
    # the controller's reward of every fixed run (engine.reward_audit), one decision per 2-step run
    assert "### Does the controller's reward see what helps?" in md
    assert rows[0.0]["progress_loss"] == res["runs"]["fixed:0/seed0"]["progress_loss"] is not None
    assert comp["reward_alignment"]["loss"]["decisions"] == 2 and rows[0.0]["progress_accuracy"] is None
    assert "| full | 1 |" in md and "| adaptive | 1 |" in md and "\n| 0 | 1 |" in md and "\n| 1 | 1 |" in md
    # did the adaptive policy learn: its final Beta and gate, per run, from its metrics (fixed runs have none)
    policy = res["runs"]["adaptive/seed0"]["policy"]
    with open(os.path.join(res["runs"]["adaptive/seed0"]["run_dir"], "metrics.jsonl")) as fh:
        last = [json.loads(ln) for ln in fh][-1]
    assert policy["beta_mean"] == last["controller/beta_mean"] and policy["gate_open_steps"] == 0
    assert res["runs"]["fixed:0/seed0"]["policy"] is None
    assert "### The adaptive policy at the end of each run" in md and "\n| adaptive | 0 | 0.50 | 4.0 |" in md

    # second invocation with one alpha more: only fixed:0.5 trains; finished runs are reused untouched
    before = _mtimes(out)
    trained = []
    real = sweep._train_one

    def counting(argv, threads, log_path):
        trained.append(argv[argv.index("--exposure") + 1])
        return real(argv, threads, log_path)

    monkeypatch.setattr(sweep, "_train_one", counting)
    res2 = sweep.main(_argv(out, tiny_model_dir, alphas="0,0.5,1"))
    assert trained == ["fixed:0.5"]
    assert {d: t for d, t in _mtimes(out).items() if d in before} == before
    assert res2["runs"]["fixed:1/seed0"]["reused"] and [r["alpha"] for r in res2["fixed_exposure"]] == [0, 0.5, 1]

    # a run that lost its summary (killed during its last evaluation) is resumed, not restarted
    os.remove(out / "fixed_0-seed0" / "summary.json")
    trained.clear()
    calls = []
    monkeypatch.setattr(sweep, "_train_one", lambda argv, t, p: calls.append(argv) or real(argv, t, p))
    res3 = sweep.main(_argv(out, tiny_model_dir, alphas="0,0.5,1"))
    assert len(calls) == 1 and "--resume" in calls[0]
    for k in ("accuracy_after", "kl_mean", "top1_agree_mean"):
        assert res3["runs"]["fixed:0/seed0"][k] == res["runs"]["fixed:0/seed0"][k]

    # other train flags in the same out dir would mix settings: refused
    with pytest.raises(SystemExit, match="use another --out"):
        sweep.main(_argv(out, tiny_model_dir) + ["--lr", "1e-2"])


def test_audit_measures_every_signal_in_the_fixed_runs_only(tiny_model_dir, tmp_path):
    out = tmp_path / "audit"
    argv = ["--out", str(out), "--alphas", "0.5,1", "--seeds", "0", "--methods", "full,random", "--steps", "6",
            "--batch-size", "2", "--eval-problems", "4", "--threads", "1", "--jobs", "1", "--audit", "--",
            "--model", tiny_model_dir, "--data", "lab", "--task-option", "size=40", "--max-new-tokens", "8",
            "--eval-max-new-tokens", "8", "--probe-accuracy-size", "4", "--eval-benchmarks", "lab-val"]  # fmt: skip
    res = sweep.main(argv)
    assert sorted(d for d in os.listdir(out) if "-seed" in d) == ["fixed_0.5-seed0", "fixed_1-seed0", "random-seed0"]

    def logged(run):
        with open(out / run / "metrics.jsonl") as fh:
            return [json.loads(ln) for ln in fh]

    for run in ("fixed_0.5-seed0", "fixed_1-seed0"):  # full == fixed:1 is measured too (measuring changes nothing)
        m = logged(run)
        assert [r["step"] for r in m if "probe_accuracy" in r] == [1, 5] and all("probe_nll" in r for r in m)
    assert not any("probe_accuracy" in r for r in logged("random-seed0"))  # the methods keep the plain flags
    assert [r["step"] for r in logged("random-seed0") if "probe_nll" in r] == [5]
    rows = {r["alpha"]: r for r in res["fixed_exposure"]}
    assert all(rows[a][f"progress_{k}"] is not None for a in rows for k in ("loss", "accuracy", "probe_nll"))
    assert res["fixed_args"] == res["train_args"] + sweep.AUDIT_FLAGS
    md = (out / "sweep.md").read_text()
    assert "| P, loss | P, probe accuracy | P, probe NLL |" in md and "| signal | rho with gain |" in md
    with open(out / "fixed_1-seed0" / "eval_summary.json") as fh:  # held out on the val split
        assert list(json.load(fh)["benchmarks"]) == ["lab-val"]
    with pytest.raises(SystemExit, match="use another --out"):  # the same runs without the audit: refused
        sweep.main([a for a in argv if a != "--audit"])
    with pytest.raises(SystemExit, match="sets .*--probe-every"):
        sweep.main(["--out", str(tmp_path / "b"), "--audit", "--", "--probe-every", "0"])


def test_intervals_and_paired_tests():
    assert report.t975(1) == 12.706 and report.t975(4) == 2.776 and report.t975(100) == 1.96
    m, ci = report.mean_ci([1.0, 2.0, 3.0, None])
    assert m == 2.0 and ci == pytest.approx(4.303 * 1.0 / 3**0.5)
    assert report.mean_ci([0.5]) == (0.5, None) and report.mean_ci([None]) == (None, None)
    p = report.paired({"0": 0.5, "1": 0.6, "2": 0.7, "3": 0.9}, {"0": 0.4, "1": 0.4, "2": 0.6})  # "3": unpaired
    assert p["n"] == 3 and p["seeds"] == ["0", "1", "2"] and p["diffs"] == pytest.approx([0.1, 0.2, 0.1])
    d = [0.1, 0.2, 0.1]
    sd = (sum((x - sum(d) / 3) ** 2 for x in d) / 2) ** 0.5
    assert p["mean"] == pytest.approx(sum(d) / 3) and p["t"] == pytest.approx((sum(d) / 3) / (sd / 3**0.5))
    assert report.paired({"0": 1.0, "1": 2.0}, {"0": 0.0, "1": 1.0})["t"] == float("inf")
    assert report.paired({"0": 1.0, "1": 2.0}, {"0": 1.0, "1": 2.0})["t"] == 0.0

    fixed = []
    for a, kl, acc in ((0.0, [0.1, 0.1, 0.2], [0.5, 0.5, 0.6]), (0.5, [0.2, 0.3, 0.3], [0.7, 0.8, 0.7]),
                       (1.0, [0.4, 0.5, 0.4], [0.4, 0.5, 0.5])):  # fmt: skip
        r = {"alpha": a, **report.aggregate([
            {"seed": s, "kl_mean": k, "top1_disagree_mean": k / 2, "accuracy_after": x}
            for s, (k, x) in enumerate(zip(kl, acc))])}  # fmt: skip
        fixed.append(r)
    methods = [{"method": m, **report.aggregate([{"seed": s, "accuracy_after": x} for s, x in enumerate(acc)])}
               for m, acc in (("adaptive", [0.8, 0.8, 0.7]), ("full", [0.4, 0.5, 0.5]))]  # fmt: skip
    comp = report.comparisons(fixed, methods)
    assert [round(r["kl_mean"]["mean"], 6) for r in comp["monotone"]] == [0.133333, 0.166667]
    assert [r["alpha"] for r in comp["interior_vs_full"]] == [0.5]
    assert comp["interior_vs_full"][0]["mean"] == pytest.approx(0.8 / 3)
    assert [r["b"] for r in comp["methods"]] == ["full", "best fixed (alpha=0.5)"]
    assert comp["methods"][1]["diffs"] == pytest.approx([0.1, 0.0, 0.0])
    md = report.tables(fixed, methods, "header", comp)
    assert "| 0.5 | +0.267 ± " in md and "| adaptive - full | +0.300 ± " in md


def test_canonical_and_cli_errors(tmp_path):
    assert report.canonical("full") == report.canonical("fixed:1.0") == "fixed:1"
    assert report.canonical("Fixed:0.50") == "fixed:0.5" and report.canonical("adaptive") == "adaptive"
    with pytest.raises(SystemExit, match="--methods"):
        sweep.main(["--out", str(tmp_path / "a"), "--methods", "bogus"])
    with pytest.raises(SystemExit, match="sets --exposure"):
        sweep.main(["--out", str(tmp_path / "b"), "--", "--exposure", "full"])
    with pytest.raises(SystemExit, match=r"\[0, 1\]"):
        sweep.main(["--out", str(tmp_path / "c"), "--alphas", "0,1.5"])


def test_help_documents_flags():
    out = subprocess.run(
        [sys.executable, "-m", "engine.sweep", "--help"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    for flag in ("--out", "--parts", "--alphas", "--seeds", "--methods", "--steps", "--batch-size",
                 "--eval-problems", "--jobs", "--threads", "--audit", "-- train flags"):  # fmt: skip
        assert flag in out.stdout, flag


def test_policy_summary_reads_the_controller_metrics_and_says_if_the_policy_learned():
    from atesd.engine.run import describe_policy, policy_summary

    assert policy_summary([{"loss": 1.0}]) is None  # fixed, random: no Beta
    window = [{"controller/beta_mean": 0.5, "controller/beta_concentration": 4.0, "controller/gate": g}
              for g in (0.0, 0.3, 0.0, 0.7)]
    assert policy_summary(window) == {"beta_mean": 0.5, "beta_concentration": 4.0, "gate_max": 0.7,
                                      "gate_open_steps": 2, "exploit_steps": None}
    reinforce = [{"controller/beta_mean": 0.6, "controller/beta_concentration": 5.0}]  # no gate: None, not 0
    assert policy_summary(reinforce)["gate_max"] is None and policy_summary(reinforce)["gate_open_steps"] is None
    row = {"method": "paper", "policy_per_seed": {"0": policy_summary(reinforce)},
           "accuracy_after_per_seed": {"0": 0.5}}
    assert report._policy_table([row])[-1] == "| paper | 0 | 0.60 | 5.0 | - | - | 0.500 |"
    # the run's last lines say whether the policy learned
    assert "drawn from the prior" in describe_policy({**policy_summary(window), "gate_open_steps": 0})
    assert describe_policy(policy_summary(window)).endswith("noise gate open at 2 steps (max 0.70)")
    assert describe_policy(policy_summary(reinforce)) == "adaptive exposure: final Beta mean 0.60, concentration 5.0"
    # --controller-exploit-end: the steps it set are counted and named
    tail = [{**r, "controller/exploit": float(i >= 2)} for i, r in enumerate(window)]
    assert policy_summary(tail)["exploit_steps"] == 2
    shut = describe_policy({**policy_summary(tail), "gate_open_steps": 0})
    assert shut.endswith("drawn from the prior Beta(2, 2) except 2 steps near the end, set by "
                         "--controller-exploit-end (docs/controller.md)")
    assert describe_policy(policy_summary(tail)).endswith(
        "(max 0.70); 2 steps near the end set by --controller-exploit-end instead of drawn")
