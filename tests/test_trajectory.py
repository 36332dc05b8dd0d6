"""The optimal trajectory: brute force, the paper's cost, Gamma above 1, scheduler integration, size and speed."""

import itertools
import math
import time

import numpy as np
import pytest
import torch

from analytic_schedulers import AnalyticDPMScheduler, GaussianDataModel
from analytic_schedulers.schedule import alphas_cumprod_from_betas, make_betas
from analytic_schedulers.trajectory import (
    optimal_trajectory,
    paper_step_cost,
    split_gamma_above_one,
    step_cost,
    step_cost_matrix,
    trajectory_cost,
)


def small_problem(T=14, seed=0):
    abar = alphas_cumprod_from_betas(torch.linspace(0.01, 0.3, T))
    gamma = torch.rand(T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.5 + 0.45
    return gamma, abar


def all_trajectories(T, K):
    for middle in itertools.combinations(range(1, T - 1), K - 2):
        yield np.array([T - 1, *middle[::-1], 0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_matches_brute_force(seed):
    T, K = 14, 5
    gamma, abar = small_problem(T, seed)
    cost = step_cost_matrix(gamma, abar)
    timesteps, dp_cost = optimal_trajectory(gamma, abar, K)
    costs = {tuple(tr): trajectory_cost(cost, tr) for tr in all_trajectories(T, K)}
    best = min(costs, key=costs.get)
    assert len(costs) == math.comb(T - 2, K - 2)
    assert dp_cost == pytest.approx(costs[best], abs=1e-12)
    assert trajectory_cost(cost, timesteps) == pytest.approx(dp_cost, abs=1e-12)
    assert timesteps.dtype == np.int64 and timesteps[0] == T - 1 and timesteps[-1] == 0 and len(timesteps) == K
    assert np.all(np.diff(timesteps) < 0)


def test_step_cost_is_papers_cost_plus_a_telescoping_term():
    T, K = 14, 5
    gamma, abar = small_problem(T, 3)
    bbar = 1 - abar
    for s, t in [(0, 1), (0, 13), (4, 9), (12, 13)]:
        telescoping = math.log(bbar[t] * abar[s] / (bbar[s] * abar[t]))
        unclipped = step_cost(gamma, abar, s, t, max_x0_variance=None)  # J assumes v_t is not clipped above
        assert unclipped == pytest.approx(paper_step_cost(gamma, abar, s, t) + telescoping, rel=1e-10, abs=1e-12)
    # so the paper's J picks the same trajectory (the DP of docs/method.md, by brute force)
    paper = {tuple(tr): sum(paper_step_cost(gamma, abar, int(s), int(t)) for t, s in zip(tr[:-1], tr[1:]))
             for tr in all_trajectories(T, K)}
    assert tuple(optimal_trajectory(gamma, abar, K, max_x0_variance=None)[0]) == min(paper, key=paper.get)


def test_exact_isotropic_gamma_makes_every_trajectory_equally_good():
    # the analytic variance is then the true reverse variance: the ELBO, hence the cost, is the same for all
    scheduler = AnalyticDPMScheduler(num_train_timesteps=14, beta_start=0.01, beta_end=0.3)
    gamma = GaussianDataModel.from_scheduler(scheduler, data_std=0.3).exact_gamma()
    cost = step_cost_matrix(gamma, scheduler._abar64)
    costs = [trajectory_cost(cost, tr) for tr in all_trajectories(14, 5)]
    assert max(costs) - min(costs) < 1e-6  # the model's float32 copy of alphas_cumprod, not the DP
    assert optimal_trajectory(gamma, scheduler._abar64, 5)[1] == pytest.approx(costs[0], abs=1e-6)


def test_gamma_above_one_runs_the_dp_below_it_as_the_official_code():
    T = 1000
    abar = alphas_cumprod_from_betas(make_betas(T, 1e-4, 0.02, "linear"))
    gamma = torch.full((T,), 0.9, dtype=torch.float64)
    gamma[900:] = 1.001  # first Gamma > 1 at t = 900: 100 bad points, the top 200 are spaced evenly
    assert split_gamma_above_one(gamma, 10) == (9, 800, 1)
    assert split_gamma_above_one(gamma, 100) == (84, 800, 16)
    timesteps, cost = optimal_trajectory(gamma, abar, 100)
    assert len(timesteps) == 100 and timesteps[0] == T - 1 and timesteps[-1] == 0 and np.all(np.diff(timesteps) < 0)
    assert np.isfinite(cost)
    upper, lower = timesteps[:16], timesteps[16:]
    assert np.all(upper >= 800) and lower[0] == 799 and np.all(lower < 800)
    np.testing.assert_allclose(np.diff(upper), -200 / 16, atol=1)
    # a single noisy value above 1 low down also works (and never yields NaN)
    gamma = torch.full((T,), 0.9, dtype=torch.float64)
    gamma[600] = 1.2
    timesteps, cost = optimal_trajectory(gamma, abar, 20)
    assert np.isfinite(cost) and timesteps[0] == T - 1 and timesteps[-1] == 0 and len(set(timesteps)) == 20


def test_gamma_above_one_almost_everywhere_is_a_clear_error():
    gamma = torch.full((100,), 1.01, dtype=torch.float64)
    abar = alphas_cumprod_from_betas(make_betas(100, 1e-3, 0.2, "linear"))
    with pytest.raises(ValueError, match="re-estimate"):
        optimal_trajectory(gamma, abar, 10)


def test_zero_terminal_snr_schedule_gives_a_finite_cost():
    T = 1000
    abar = alphas_cumprod_from_betas(make_betas(T, 1e-4, 0.02, "linear", rescale_betas_zero_snr=True))
    assert abar[-1] == 0
    gamma = torch.linspace(0.2, 1.0, T, dtype=torch.float64)
    timesteps, cost = optimal_trajectory(gamma, abar, 10)
    assert np.isfinite(cost) and timesteps[0] == T - 1 and timesteps[-1] == 0


def test_bad_arguments():
    gamma, abar = small_problem()
    for K in (0, 1, 15):
        with pytest.raises(ValueError, match="num_steps"):
            optimal_trajectory(gamma, abar, K)
    with pytest.raises(ValueError, match="entries"):
        optimal_trajectory(gamma[:-1], abar, 5)
    all_steps, _ = optimal_trajectory(gamma, abar, 14)
    np.testing.assert_array_equal(all_steps, np.arange(13, -1, -1))


def test_timestep_spacing_optimal_in_the_scheduler():
    base = AnalyticDPMScheduler(clip_sample=False)
    model = GaussianDataModel.from_scheduler(base, data_std=torch.linspace(0.05, 0.6, 64))
    gamma = model.exact_gamma()
    scheduler = AnalyticDPMScheduler.from_config(base.config, gamma=gamma, timestep_spacing="optimal")
    scheduler.set_timesteps(10)
    expected, _ = optimal_trajectory(gamma, scheduler._abar64, 10)
    np.testing.assert_array_equal(scheduler.timesteps.numpy(), expected)
    assert scheduler.num_inference_steps == 10
    # a second call uses the cache; the config round-trips
    scheduler.set_timesteps(10)
    np.testing.assert_array_equal(scheduler.timesteps.numpy(), expected)
    again = AnalyticDPMScheduler.from_config(dict(scheduler.config))
    again.set_timesteps(10)
    np.testing.assert_array_equal(again.timesteps.numpy(), expected)
    # the sampler steps through it
    x = torch.randn(4, 1, 8, 8)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x).prev_sample
    assert torch.isfinite(x).all()


def test_timestep_spacing_optimal_without_gamma_is_a_clear_error():
    scheduler = AnalyticDPMScheduler(timestep_spacing="optimal", gamma_from_batch=True)
    with pytest.raises(ValueError, match="Gamma table"):
        scheduler.set_timesteps(10)


def test_timestep_spacing_optimal_for_sn_dpm():
    sn = pytest.importorskip("analytic_schedulers.scheduling_sn_dpm")
    base = AnalyticDPMScheduler()
    gamma = GaussianDataModel.from_scheduler(base, data_std=torch.linspace(0.05, 0.6, 64)).exact_gamma()
    scheduler = sn.SNDPMScheduler.from_config(base.config, gamma=gamma, timestep_spacing="optimal")
    scheduler.set_timesteps(10)
    np.testing.assert_array_equal(scheduler.timesteps.numpy(), optimal_trajectory(gamma, base._abar64, 10)[0])
    with pytest.raises(ValueError, match="Gamma table"):
        sn.SNDPMScheduler(timestep_spacing="optimal").set_timesteps(10)


def test_four_thousand_timesteps():
    scheduler = AnalyticDPMScheduler(num_train_timesteps=4000, beta_schedule="squaredcos_cap_v2")
    gamma = GaussianDataModel.from_scheduler(scheduler, data_std=torch.linspace(0.05, 0.6, 16),
                                             sample_size=4).exact_gamma()
    timesteps, cost = optimal_trajectory(gamma, scheduler._abar64, 12)
    assert timesteps[0] == 3999 and timesteps[-1] == 0 and len(set(timesteps)) == 12 and np.isfinite(cost)


def test_dp_is_fast():
    # relative, not absolute: K = 100 over T = 1000 must cost at most a few hundred [T, T] add-and-min passes
    T, K = 1000, 100
    gamma, abar = small_problem(T)
    cost = torch.rand(T, T, dtype=torch.float64)
    best = torch.rand(T, dtype=torch.float64)
    reference = []
    for _ in range(3):
        start = time.perf_counter()
        (cost + best[:, None]).min(dim=0)
        reference.append(time.perf_counter() - start)
    start = time.perf_counter()
    optimal_trajectory(gamma, abar, K)
    elapsed = time.perf_counter() - start
    assert elapsed < 400 * min(reference) + 0.5
