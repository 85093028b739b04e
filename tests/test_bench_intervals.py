"""Paired intervals of the bench's ratios (speed-up, efficiency, reduction share)."""

import csv
import io
import random

import pytest
from rich.console import Console

from imagepiece import bench
from imagepiece.bench import BenchConfig, run_benchmark
from imagepiece.measure import paired_ratio_interval

TINY = "vit_tiny_patch16_224"
TINY_KW = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2)


def _drifting(rounds: int, calls: int, ratio: float, seed: int = 0):
    """Times whose rounds drift together by up to 2x (a shared slow spell), the numerator
    ``ratio`` times the denominator within each round, with 1% jitter per call."""
    rng = random.Random(seed)
    num, den = [], []
    for _ in range(rounds):
        spell = rng.uniform(1.0, 2.0)
        for _ in range(calls):
            den.append(spell * rng.uniform(0.99, 1.01))
            num.append(ratio * spell * rng.uniform(0.99, 1.01))
    return num, den


def test_a_slow_spell_both_sides_shared_cancels_in_the_interval():
    num, den = _drifting(rounds=20, calls=1, ratio=1.25)
    lo, hi = paired_ratio_interval(num, den)
    assert lo <= 1.25 <= hi and hi - lo < 0.05
    # the same times with the pairs broken: the drift is no longer shared, the interval widens
    rng = random.Random(1)
    shuffled = den[:]
    rng.shuffle(shuffled)
    lo_u, hi_u = paired_ratio_interval(num, shuffled)
    assert hi_u - lo_u > 5 * (hi - lo)


def test_calls_of_one_round_are_resampled_together():
    num, den = _drifting(rounds=12, calls=5, ratio=0.8, seed=3)
    lo, hi = paired_ratio_interval(num, den, calls=5)
    assert lo <= 0.8 <= hi and hi - lo < 0.03
    # read as 60 rounds of one call, the calls of one round would pair with another's
    assert paired_ratio_interval(num, den, calls=5) != paired_ratio_interval(num, den, calls=1)


def test_no_interval_from_fewer_than_three_rounds_or_unpaired_lists():
    assert paired_ratio_interval([1.0, 2.0], [1.0, 2.0]) is None
    assert paired_ratio_interval([1.0, 2.0, 3.0], [1.0, 2.0]) is None
    assert paired_ratio_interval([1.0] * 7, [1.0] * 7, calls=2) is None  # not whole rounds
    assert paired_ratio_interval([2.0] * 3, [1.0] * 3) == pytest.approx((2.0, 2.0))


@pytest.fixture(scope="module")
def latency():
    return run_benchmark(BenchConfig(
        model=TINY, model_kwargs=dict(TINY_KW), warmup=1, runs=3, calls=2, latency=True,
        batch_sizes=(1,), threads=(1,), methods=("none", "tome"), busy_check=False))


def test_bench_reports_each_ratio_with_its_paired_interval(latency, tmp_path):
    base, tome = latency.variants
    assert base.speedup_ci == pytest.approx((1.0, 1.0))  # the baseline against itself
    for v in (base, tome):
        for name in ("speedup", "efficiency", "reduction_share"):
            lo, hi = getattr(v, f"{name}_ci")
            assert lo <= hi
    # the share's interval is the efficiency's read on times: 1 - (limit p50 / variant p50)
    assert tome.reduction_share_ci == pytest.approx(
        tuple(1 - r for r in reversed(paired_ratio_interval(tome.limit_times, tome.times, 2))))
    out = Console(width=250, record=True, file=io.StringIO())
    bench.render(latency, out)
    text = out.export_text()
    lo, hi = tome.reduction_share_ci
    assert f"{tome.reduction_share:.0%} ({lo:.0%}, {hi:.0%})" in text and "paired bootstrap" in text
    path = tmp_path / "b.csv"
    bench.write_csv(latency, str(path))
    row = list(csv.DictReader(path.open()))[1]
    assert float(row["reduction_share_ci_lo"]) == pytest.approx(lo)
    assert float(row["speedup_ci_hi"]) == pytest.approx(tome.speedup_ci[1])
