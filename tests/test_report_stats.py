"""Report rows keyed by overrides, confidence intervals, paired claims and their verdicts, learning curves, and
the inputs a report refuses: on synthetic run dirs (metrics.json + CSV logs), no training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from consisid_lab import report
from consisid_lab.analysis.claims import ClaimsError, evaluate_claims, parse_claims
from consisid_lab.analysis.curves import Curve, normalised_area
from consisid_lab.analysis.run_dirs import RunDirError
from consisid_lab.analysis.stats import (
    UnpairedSeedsError,
    bootstrap_mean_ci,
    minimal_detectable_effect,
    paired_difference,
    seeds_needed,
    verdict,
)
from consisid_lab.utils.run import recorded_overrides


def _run(
    root: Path,
    num: int,
    experiment: str,
    seed: int,
    facesim: float,
    overrides: list[str] | None = None,
    version: str | None = "aaaa000011112222",
    gap: list[tuple[int, float]] | None = None,
    status: str = "completed",
) -> Path:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(f"experiment_name: {experiment}\nseed: {seed}\n")
    (job / ".hydra" / "overrides.yaml").write_text(f"- +experiment={experiment}\n- seed={seed}\n")
    data = {
        "experiment": experiment,
        "seed": seed,
        "status": status,
        "metrics": {"test/facesim": facesim, "test/fid": 50.0 - 10 * facesim},
        "stability": {"max_grad_norm": 1.0 + seed},
        "overrides": ["debug=fast", *(overrides or [])],
        "benchmark": {"version": version, "recipe": "tiny", "entries": {}} if version else None,
    }
    (job / "metrics.json").write_text(json.dumps(data))
    if gap is not None:
        (job / "csv").mkdir()
        with open(job / "csv" / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "train/loss", "train/grad_norm", "val/identity_gap"])
            writer.writeheader()
            for step, value in gap:
                writer.writerow({"step": step, "train/loss": 1.0, "train/grad_norm": 2.0 + step})
                writer.writerow({"step": step, "val/identity_gap": value})
    return job


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {r["row"]: r for r in csv.DictReader(f)}


# ------------------------------------------------------------------------------------------------ statistics
def test_bootstrap_ci_matches_the_normal_interval_on_a_large_sample_and_is_exact_when_degenerate():
    x = np.random.default_rng(3).normal(0.5, 1.0, 400)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    low, high = bootstrap_mean_ci(x)
    assert low == pytest.approx(x.mean() - half, abs=0.01) and high == pytest.approx(x.mean() + half, abs=0.01)
    assert bootstrap_mean_ci([0.3, 0.3, 0.3]) == (0.3, 0.3)
    assert all(np.isnan(bootstrap_mean_ci([0.3])))
    assert bootstrap_mean_ci([0.1, 0.2, 0.25]) == bootstrap_mean_ci([0.1, 0.2, 0.25]), "a fixed random stream"


def test_minimal_detectable_effect_follows_the_t_formula():
    # t_{0.975,2} = 4.3027, t_{0.8,2} = 1.0607 (tables): (4.3027 + 1.0607) * 1 / sqrt(3)
    assert minimal_detectable_effect(1.0, 3) == pytest.approx(3.0966, abs=1e-3)
    # t_{0.975,9} = 2.2622, t_{0.8,9} = 0.8834
    assert minimal_detectable_effect(0.5, 10) == pytest.approx((2.2622 + 0.8834) * 0.5 / np.sqrt(10), abs=1e-3)
    assert minimal_detectable_effect(1.0, 1) == float("inf")


@pytest.mark.parametrize(
    ("ci", "direction", "expected"),
    [
        ((0.1, 0.3), "higher", "supported"),
        ((0.1, 0.3), "lower", "contradicted"),
        ((-0.3, -0.1), "lower", "supported"),
        ((-0.3, -0.1), "higher", "contradicted"),
        ((-0.1, 0.3), "higher", "inconclusive"),
        ((float("nan"), float("nan")), "higher", "inconclusive"),
    ],
)
def test_verdict_follows_the_interval_and_the_declared_direction(ci, direction, expected):
    assert verdict(*ci, direction) == expected


def test_paired_difference_pairs_by_seed_and_names_missing_seeds():
    d = paired_difference({0: 0.7, 1: 0.8, 2: 0.9}, {2: 0.6, 0: 0.5, 1: 0.5})
    assert d.seeds == (0, 1, 2) and d.differences == pytest.approx((0.2, 0.3, 0.3))
    assert d.mean == pytest.approx(0.8 / 3) and d.ci_low > 0 and d.mde > 0
    with pytest.raises(UnpairedSeedsError, match=r"'no_global' lacks seed\(s\) \[2\]"):
        paired_difference({0: 1.0, 1: 1.0, 2: 1.0}, {0: 0.0, 1: 0.0}, "'full'", "'no_global'")


def test_three_seeds_one_way_are_not_enough_when_their_spread_is_wide():
    """A bootstrap interval stays inside the seeds' range (it excludes 0 whenever all differences are positive);
    the verdict's interval is the union with the paired t interval, which does not."""
    diffs = {0: 0.01, 1: 0.2, 2: 0.05}
    d = paired_difference(diffs, {0: 0.0, 1: 0.0, 2: 0.0})
    assert d.boot_low > 0, "the bootstrap alone would call this supported"
    mean, sd = np.mean(list(diffs.values())), np.std(list(diffs.values()), ddof=1)
    assert d.t_low == pytest.approx(mean - 4.3027 * sd / np.sqrt(3), abs=1e-3) and d.t_low < 0
    assert (d.ci_low, d.ci_high) == (min(d.boot_low, d.t_low), max(d.boot_high, d.t_high))
    assert verdict(d.ci_low, d.ci_high, "higher") == "inconclusive"
    tight = paired_difference({0: 0.30, 1: 0.31, 2: 0.29}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert verdict(tight.ci_low, tight.ci_high, "higher") == "supported"


def test_seeds_needed_is_the_first_count_whose_mde_reaches_the_effect():
    n = seeds_needed(0.05, 0.04)
    assert minimal_detectable_effect(0.05, n) <= 0.04 < minimal_detectable_effect(0.05, n - 1)
    assert seeds_needed(0.05, -0.04) == n, "the sign of the effect does not matter"
    assert seeds_needed(0.0, 0.1) == 2 and seeds_needed(1.0, 0.0) is None and seeds_needed(1.0, 1e-4) is None
    d = paired_difference({0: 0.3, 1: 0.2, 2: 0.25}, {0: 0.2, 1: 0.2, 2: 0.2})
    assert d.seeds_needed == seeds_needed(d.sd, d.mean)


def test_recorded_overrides_drop_bookkeeping():
    given = ["+experiment=full", "seed=1", "model/fuser=mlp", "model.lr=1e-4", "data.batch_size=2"]
    given += ["paths.cache_dir=/x", "ckpt_path=/y", "hydra.sweep.dir=/z", "logger=csv", "~callbacks.progress"]
    assert recorded_overrides(given) == ["model/fuser=mlp", "model.lr=1e-4", "data.batch_size=2"]


# ------------------------------------------------------------------------------------------------ report rows
@pytest.fixture
def fuser_sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    gap = [(0, 0.0), (10, 1.0), (20, 1.0)]
    for i, (fuser, base) in enumerate((("perceiver", 0.8), ("mlp", 0.5))):
        for seed in range(3):
            num = 3 * i + seed
            _run(root, num, "full", seed, base + 0.01 * seed, [f"model/fuser={fuser}"], gap=gap)
    for seed in range(3):
        _run(root, 6 + seed, "no_global", seed, 0.1 + 0.02 * seed, ["model/fuser=perceiver"], gap=gap[:2])
    return root


def test_runs_that_differ_in_a_component_override_are_separate_rows(fuser_sweep, tmp_path):
    out = tmp_path / "out"
    assert report.main([str(fuser_sweep), "--out", str(out)]) == 0
    rows = _rows(out / "report.csv")
    assert list(rows) == ["full [model/fuser=perceiver]", "full [model/fuser=mlp]", "no_global"]
    perceiver = rows["full [model/fuser=perceiver]"]
    assert perceiver["n_seeds"] == "3" and perceiver["overrides"] == "debug=fast model/fuser=perceiver"
    assert float(perceiver["facesim_mean"]) == pytest.approx(0.81)
    assert float(rows["full [model/fuser=mlp]"]["facesim_mean"]) == pytest.approx(0.51)
    low, high = bootstrap_mean_ci([0.8 + 0.01 * seed for seed in range(3)])
    assert float(perceiver["facesim_ci_low"]) == pytest.approx(low)
    assert float(perceiver["facesim_ci_high"]) == pytest.approx(high)
    # the learning-curve area: trapezoid of (0, 0), (10, 1), (20, 1) over 20 steps = 0.75
    assert float(perceiver["val_identity_gap_auc_mean"]) == pytest.approx(0.75)
    assert float(rows["no_global"]["val_identity_gap_auc_mean"]) == pytest.approx(0.5)
    md = (out / "report.md").read_text()
    assert "| full [model/fuser=mlp] | 3 (0,1,2) |" in md and "benchmark (stand-in hash) aaaa000011112222" in md
    for name in ("report_curves.png", "report_grad_norm.png"):
        assert (out / name).stat().st_size > 1000


def test_normalised_area_is_the_mean_height():
    assert normalised_area(Curve(np.array([0, 10, 20]), np.array([0.0, 1.0, 1.0]))) == pytest.approx(0.75)
    assert normalised_area(Curve(np.array([5]), np.array([0.4]))) == pytest.approx(0.4)


def test_runs_of_two_benchmark_versions_are_refused_naming_both(tmp_path):
    root = tmp_path / "sweep"
    _run(root, 0, "full", 0, 0.8, version="aaaa000011112222")
    _run(root, 1, "full", 1, 0.8, version="bbbb333344445555")
    with pytest.raises(RunDirError, match="aaaa000011112222.*bbbb333344445555"):
        report.report(root, tmp_path / "out")
    assert report.main([str(root), "--out", str(tmp_path / "out")]) == 2


# ------------------------------------------------------------------------------------------------ claims
CLAIMS = """
claims:
  - claim: the perceiver fuser beats the MLP
    treatment: full [model/fuser=perceiver]
    control: full [model/fuser=mlp]
    metric: facesim
    direction: higher
  - claim: the low-frequency route lowers FID
    treatment: full [model/fuser=perceiver]
    control: no_global
    metric: fid
    direction: higher
  - claim: gradient norms do not differ
    treatment: full [model/fuser=perceiver]
    control: no_global
    metric: max_grad_norm
    direction: lower
"""


def test_claims_give_a_verdict_table_and_a_forest_plot(fuser_sweep, tmp_path):
    claims = tmp_path / "claims.yaml"
    claims.write_text(CLAIMS)
    out = tmp_path / "out"
    assert report.main([str(fuser_sweep), "--claims", str(claims), "--out", str(out)]) == 0
    with open(out / "report_claims.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["verdict"] for r in rows] == ["supported", "contradicted", "inconclusive"]
    assert float(rows[0]["mean_difference"]) == pytest.approx(0.3) and rows[0]["seeds"] == "0 1 2"
    assert float(rows[2]["mean_difference"]) == 0.0 and float(rows[2]["mde"]) == 0.0
    md = (out / "report.md").read_text()
    assert "## Claims" in md and "**supported**" in md and "**contradicted**" in md
    assert (out / "report_forest.png").stat().st_size > 1000


def _values() -> dict:
    return {"full": {0: {"facesim": 0.8}, 1: {"facesim": 0.7}}, "no_global": {0: {"facesim": 0.1}}}


def test_a_claim_naming_an_unknown_row_or_metric_lists_what_exists():
    base = {"claim": "c", "treatment": "full", "control": "no_global", "metric": "facesim", "direction": "higher"}
    with pytest.raises(ClaimsError, match=r"treatment 'fulll' is no row of this sweep; rows: 'full', 'no_global'"):
        evaluate_claims(parse_claims([{**base, "treatment": "fulll"}]), _values())
    with pytest.raises(ClaimsError, match=r"metric 'facesimm' is in no run; metrics: 'facesim'"):
        evaluate_claims(parse_claims([{**base, "metric": "facesimm"}]), _values())
    with pytest.raises(UnpairedSeedsError, match=r"lacks seed\(s\) \[1\]"):
        evaluate_claims(parse_claims([base]), _values())


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([{"claim": "c", "treatment": "a", "control": "b", "metric": "m"}], "missing direction"),
        ([{"claim": "c", "treatment": "a", "control": "b", "metric": "m", "direction": "up"}], "'higher', 'lower'"),
        ([{"claim": "c", "treatment": "a", "control": "b", "metric": "m", "direction": "higher", "x": 1}], "x"),
        ({"claims": []}, "non-empty list"),
        ("claims", "non-empty list"),
    ],
)
def test_malformed_claims_name_the_problem(data, match):
    with pytest.raises(ClaimsError, match=match):
        parse_claims(data)


def test_the_cli_reports_a_bad_claims_file_in_one_line(fuser_sweep, tmp_path, caplog):
    claims = tmp_path / "claims.yaml"
    claims.write_text(CLAIMS.replace("metric: fid", "metric: fidd"))
    assert report.main([str(fuser_sweep), "--claims", str(claims), "--out", str(tmp_path / "o")]) == 2
    assert "metric 'fidd' is in no run; metrics:" in caplog.text and "'facesim'" in caplog.text
