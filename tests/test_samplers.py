"""Sampler trajectories against diffusers' schedulers built with `from_config(<folder's scheduler config>)`.

Tolerance: 1e-4 relative to the largest latent value, the project's fp32 bar. Most cases agree to 2e-6;
the worst measured is 2e-5 (Heun, 2 steps): its correction divides by σ_min ≈ 0.03, which turns a
one-ulp difference in the UNet input scaling (x·(1/s) here, x/s in diffusers) into 1e-5.

The "UNet" here is a fixed nonlinear function of the latent and the timestep, so every intermediate
latent of ldm's pure-function samplers can be compared with the scheduler's `step` outputs.
"""

import pytest
import torch
from conftest import max_rel_err
from official import SD1_SCHEDULER, SD21_SCHEDULER, SDXL_SCHEDULER, diffusers_scheduler

from ldm.errors import InputError
from ldm.sampling.denoisers import PredictionDenoiser
from ldm.sampling.samplers import SAMPLERS, Step, get_ancestral_step
from ldm.sampling.schedules import Schedule, SchedulerConfig

CONFIGS = {"sd1-eps": SD1_SCHEDULER, "sd21-v": SD21_SCHEDULER, "sdxl-eps": SDXL_SCHEDULER}
DIFFUSERS = list(SAMPLERS)
KARRAS = [name for name, spec in SAMPLERS.items() if spec.karras]
TRAJECTORY_TOL = 1e-4
# diffusers keeps these in variance-preserving form; ldm works in σ-space
VP_LATENTS = ("pndm", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lcm", "tcd")


def fake_unet(x: torch.Tensor, t) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.tanh(0.8 * x + torch.sin(t / 97.0 + x.roll(1, -1))) * 0.7 + 0.2 * x


def diffusers_trajectory(name, config, steps, seed, eta=None, karras=False):
    """The latents after each step of diffusers' scheduler for `name` on `fake_unet` (eta: its step's default when
    None: DDIM's 0, TCD's γ 0.3)."""
    scheduler = diffusers_scheduler(name, config, karras)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 6, 5, generator=generator) * scheduler.init_noise_sigma
    trajectory = []
    for n, t in enumerate(scheduler.timesteps):
        out = fake_unet(scheduler.scale_model_input(x, t), t)
        extra = {"generator": generator} if "generator" in SAMPLERS[name].options else {}
        extra |= {"eta": eta} if "eta" in SAMPLERS[name].options and eta is not None else {}
        x = scheduler.step(out, t, x, **extra).prev_sample
        # Heun: a step ends after its correction, or after the last (Euler) call into σ = 0
        if getattr(scheduler, "state_in_first_order", True) or n == len(scheduler.timesteps) - 1:
            trajectory.append(x)
    return trajectory


def ldm_trajectory(name, config, steps, seed, eta=None, karras=False):
    cfg = SchedulerConfig.from_diffusers(config)
    spec = SAMPLERS[name]
    schedule = spec.schedule(cfg, steps, karras)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 6, 5, generator=generator) * schedule.init_noise_sigma
    trajectory = []

    def record(step):
        sigma_next = schedule.sigmas[step.i + 1]
        trajectory.append(step.x / (1 + sigma_next**2) ** 0.5 if name in VP_LATENTS else step.x)

    spec.sample(PredictionDenoiser(fake_unet, schedule, cfg.prediction_type), x, schedule, record, eta=eta,
                generator=generator, output=cfg.prediction_type)
    return trajectory


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(DIFFUSERS))
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 25])
def test_trajectory_matches_diffusers(name, config, steps):
    expected = diffusers_trajectory(name, CONFIGS[config], steps, seed=steps)
    actual = ldm_trajectory(name, CONFIGS[config], steps, seed=steps)
    assert len(actual) == len(expected) == steps + (name == "pndm" and steps > 1)  # PNDM: one call per entry
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert max_rel_err(a, e) < TRAJECTORY_TOL, f"step {i}"


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", KARRAS)
@pytest.mark.parametrize("steps", [1, 2, 5, 20])
def test_karras_trajectory_matches_diffusers(name, config, steps):
    expected = diffusers_trajectory(name, CONFIGS[config], steps, seed=steps, karras=True)
    actual = ldm_trajectory(name, CONFIGS[config], steps, seed=steps, karras=True)
    assert len(actual) == len(expected) == steps
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert max_rel_err(a, e) < TRAJECTORY_TOL, f"step {i}"


def test_karras_where_diffusers_has_it():
    from ldm.pipelines.request import GenerationRequest

    # EulerAncestral, DDIM and PNDM have no use_karras_sigmas
    assert KARRAS == ["euler", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]
    with pytest.raises(InputError, match="--karras applies to euler, heun, lms, dpmpp_2m, dpmpp_2m_sde, unipc, not"):
        GenerationRequest("", steps=10, sampler="ddim", karras=True).check()


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta_draws_noise_like_diffusers(eta):
    expected = diffusers_trajectory("ddim", SD1_SCHEDULER, 10, seed=1, eta=eta)
    actual = ldm_trajectory("ddim", SD1_SCHEDULER, 10, seed=1, eta=eta)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert max_rel_err(a, e) < TRAJECTORY_TOL, f"step {i}"


def test_schedules_match_diffusers_grids():
    for name in DIFFUSERS:
        for config in CONFIGS.values():
            scheduler = diffusers_scheduler(name, config)
            scheduler.set_timesteps(10)
            schedule = SAMPLERS[name].schedule(SchedulerConfig.from_diffusers(config), 10)
            timesteps = scheduler.timesteps.tolist()
            if name == "heun":  # diffusers interleaves each timestep after the first for the correction
                timesteps = timesteps[:1] + timesteps[1::2]
            assert schedule.timesteps == pytest.approx(timesteps)
            init = schedule.init_noise_sigma
            if name in VP_LATENTS:  # in σ-space the initial noise is scaled to σ_max's variance
                init /= (1 + schedule.sigmas[0] ** 2) ** 0.5
            assert init == pytest.approx(float(scheduler.init_noise_sigma), rel=1e-6)
            if name in ("euler", "euler_a", "lms", "dpmpp_2m", "dpmpp_2m_sde", "unipc"):
                assert schedule.sigmas == pytest.approx(scheduler.sigmas.tolist(), rel=1e-6)


def test_spacing_defaults_follow_the_scheduler_class():
    cfg = SchedulerConfig.from_diffusers(SD1_SCHEDULER)  # no timestep_spacing in the file
    assert SAMPLERS["euler"].schedule(cfg, 4).timesteps == pytest.approx([999.0, 666.0, 333.0, 0.0])  # linspace
    assert SAMPLERS["ddim"].schedule(cfg, 4).timesteps == [751.0, 501.0, 251.0, 1.0]  # leading + offset


def test_v_prediction_wrapper_is_the_closed_form():
    # x = x0 + σ·ε in σ-space; the UNet sees x/√(1+σ²) and predicts v = α·ε - s·x0 with α = 1/√(1+σ²),
    # s = σ/√(1+σ²) (Salimans & Ho 2022). The wrapper must return x0 exactly.
    sigma = 3.7
    x0, eps = torch.randn(2, 4, 3, 3, dtype=torch.float64).unbind(0)
    x = x0 + sigma * eps
    alpha, s = 1 / (1 + sigma**2) ** 0.5, sigma / (1 + sigma**2) ** 0.5

    def v_model(x_in, t):
        assert torch.allclose(x_in, x * alpha) and t == 500.0
        return alpha * eps - s * x0

    def eps_model(x_in, t):
        return eps

    schedule = Schedule([sigma, 0.0], [500.0], 1.0)
    assert torch.allclose(PredictionDenoiser(v_model, schedule, "v_prediction")(x, sigma), x0)
    assert torch.allclose(PredictionDenoiser(eps_model, schedule, "epsilon")(x, sigma), x0)


def test_a_folder_asking_for_karras_gets_it(sd1_folder, tmp_path):
    import json
    import shutil

    from ldm.pipelines.stable_diffusion import StableDiffusion

    folder = shutil.copytree(sd1_folder, tmp_path / "karras")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config |= {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    pipe = StableDiffusion.from_pretrained(folder)
    assert pipe.default_sampler == "dpmpp_2m"
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in pipe("a cat", steps=2, seed=0).infotexts[0]
    assert "Sampler: DDIM," in pipe("a cat", steps=2, seed=0, sampler="ddim").infotexts[0]  # no Karras grid


@pytest.mark.parametrize("spacing, steps", [("linspace", 10), ("linspace", 3), ("trailing", 7), ("trailing", 10)])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("name, eta", [("ddim", 0.0), ("ddim", 0.5), ("pndm", 0.0)])
def test_off_grid_steps_match_diffusers(name, spacing, steps, eta, set_alpha_to_one):
    # diffusers' DDIM and PNDM step from t to t - 1000//steps; with these spacings that misses the next
    # grid timestep (and PNDM's correction starts from t + 1000//steps)
    config = SD1_SCHEDULER | {"timestep_spacing": spacing, "set_alpha_to_one": set_alpha_to_one}
    expected = diffusers_trajectory(name, config, steps, seed=steps, eta=eta)
    actual = ldm_trajectory(name, config, steps, seed=steps, eta=eta)
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert max_rel_err(a, e) < TRAJECTORY_TOL, f"step {i}"


@pytest.mark.parametrize("config", ["sd1-eps", "sd21-v"])
@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75, 0.95])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_started_part_way_like_diffusers_img2img(name, config, strength):
    # image-to-image: diffusers slices its timestep list at t_start and starts its counters there;
    # for PNDM that list has its second timestep twice, so the slice shifts by one and the counter restarts
    steps, cfg = 10, CONFIGS[config]
    scheduler = diffusers_scheduler(name, cfg)
    scheduler.set_timesteps(steps)
    t_start = steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    generator = torch.Generator().manual_seed(3)
    init = torch.randn(1, 4, 6, 5, generator=generator)
    noise = torch.randn(1, 4, 6, 5, generator=generator)
    x = scheduler.add_noise(init, noise, timesteps[:1])
    expected = []
    for n, t in enumerate(timesteps):
        out = fake_unet(scheduler.scale_model_input(x, t), t)
        extra = {"generator": generator} if "generator" in SAMPLERS[name].options else {}
        x = scheduler.step(out, t, x, **extra).prev_sample
        if getattr(scheduler, "state_in_first_order", True) or n == len(timesteps) - 1:
            expected.append(x)

    spec, config_ = SAMPLERS[name], SchedulerConfig.from_diffusers(cfg)
    schedule = spec.schedule(config_, steps, False).from_strength(strength)
    generator = torch.Generator().manual_seed(3)
    init = torch.randn(1, 4, 6, 5, generator=generator)
    x = init + torch.randn(1, 4, 6, 5, generator=generator) * schedule.sigmas[0]
    actual = []

    def record(step):
        sigma_next = schedule.sigmas[step.i + 1]
        actual.append(step.x / (1 + sigma_next**2) ** 0.5 if name in VP_LATENTS else step.x)

    spec.sample(PredictionDenoiser(fake_unet, schedule, config_.prediction_type), x, schedule, record, eta=None,
                generator=generator, output=config_.prediction_type)
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert max_rel_err(a, e) < TRAJECTORY_TOL, f"step {i}"


# ------------------------------------------------------------------------------------------- step events


def _run_recorded(name, steps=4, callback=None, config=SD1_SCHEDULER):
    """Run `name` on a toy denoiser that records what it returns; the events the callback saw."""
    cfg = SchedulerConfig.from_diffusers(config)
    spec = SAMPLERS[name]
    schedule = spec.schedule(cfg, steps, False)
    returned = []

    def model(x, sigma):
        returned.append((sigma, x * 0.9 + 0.01 * sigma))
        return returned[-1][1]

    events = []

    def record(step):
        events.append(step)
        return None if callback is None else callback(step)

    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * schedule.init_noise_sigma
    out = spec.sample(model, x, schedule, record, eta=0.5, generator=torch.Generator().manual_seed(1),
                      output=cfg.prediction_type)
    return schedule, returned, events, out


# the evaluation each step reports: the first of its step (Heun evaluates twice, the last step into 0 once)
def _reported(name, returned, sigmas):
    if name != "heun":
        return returned
    first, k = [], 0
    for i in range(len(sigmas) - 1):
        first.append(returned[k])
        k += 1 if sigmas[i + 1] == 0 else 2
    return first


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_each_step_is_one_event(name):
    schedule, returned, events, out = _run_recorded(name)
    sigmas = schedule.sigmas
    total = len(sigmas) - 1
    assert [e.i for e in events] == list(range(total))
    assert all(isinstance(e, Step) and e.total == total for e in events)
    assert [e.sigma for e in events] == sigmas[:-1]
    reported = _reported(name, returned, sigmas)
    assert len(reported) == total
    for e, (sigma, denoised) in zip(events, reported, strict=True):
        assert sigma == e.sigma and e.denoised is denoised
    assert events[-1].x is out


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_a_callback_replaces_the_latents(name):
    replacements = []

    def replace(step):
        replacements.append(torch.full_like(step.x, 0.1 * (step.i + 1)))
        return replacements[-1]

    schedule, returned, events, out = _run_recorded(name, callback=replace)
    assert out is replacements[-1] and len(replacements) == len(events)
    # each step after a replacement starts from it: its first evaluation sees the replaced latents
    reported = _reported(name, returned, schedule.sigmas)
    for (sigma, denoised), replaced in zip(reported[1:], replacements[:-1], strict=True):
        assert torch.equal(denoised, replaced * 0.9 + 0.01 * sigma)


def test_ancestral_step_splits_the_variance():
    sigma_down, sigma_up = get_ancestral_step(3.0, 1.5)
    assert sigma_down**2 + sigma_up**2 == pytest.approx(1.5**2)
    assert sigma_up == pytest.approx((1.5**2 * (3.0**2 - 1.5**2) / 3.0**2) ** 0.5)
    assert get_ancestral_step(3.0, 1.5, eta=0.0) == (1.5, 0.0)


# ------------------------------------------------------------------------------------------- off-grid σ


def k_diffusion_sigma_to_t(sigma: float, training_sigmas) -> float:
    """k-diffusion's `DiscreteSchedule.sigma_to_t` (k_diffusion/external.py), without quantize."""
    log_sigmas = torch.as_tensor(training_sigmas).log()
    log_sigma = torch.tensor([sigma], dtype=log_sigmas.dtype).log()
    dists = log_sigma - log_sigmas[:, None]
    low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    return float((1 - w) * low_idx + w * high_idx)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "ddim", "pndm"])
def test_off_grid_sigma_interpolates_the_timestep_like_k_diffusion(name):
    schedule = SAMPLERS[name].schedule(SchedulerConfig.from_diffusers(SD1_SCHEDULER), 10, False)
    seen = []
    denoiser = PredictionDenoiser(lambda x, t: seen.append(t) or x, schedule)
    x = torch.zeros(1, 4, 2, 2)
    for sigma, t in zip(schedule.sigmas, schedule.timesteps, strict=False):  # on the grid: the schedule's own
        denoiser(x, sigma)
        assert seen[-1] == t
    training = schedule.training_sigmas
    for sigma in (0.5, 1.234, 7.0, float(training[0]) * 0.5, float(training[-1]) * 2,
                  (float(training[300]) * float(training[301])) ** 0.5):
        denoiser(x, sigma)
        assert seen[-1] == pytest.approx(k_diffusion_sigma_to_t(sigma, training), abs=1e-3)
    assert seen[-1] == pytest.approx(300.5, abs=1e-3)  # halfway in log σ between two training σ
    with pytest.raises(KeyError, match="not on the schedule"):
        PredictionDenoiser(lambda x, t: x, Schedule([2.0, 0.0], [500.0], 1.0))(x, 1.0)


# ------------------------------------------------------------------------------ few-step samplers, spacing, x0


def _assert_same_trajectory(name, config, steps, seed, eta=None):
    expected = diffusers_trajectory(name, config, steps, seed=seed, eta=eta)
    actual = ldm_trajectory(name, config, steps, seed=seed, eta=eta)
    assert len(actual) == len(expected) == steps
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert max_rel_err(a, e) < TRAJECTORY_TOL, f"step {i}"


@pytest.mark.parametrize("eta", [None, 0.0, 0.7, 1.0])  # None: TCD's own γ, 0.3
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_tcd_gamma_matches_diffusers(steps, eta):
    _assert_same_trajectory("tcd", SD1_SCHEDULER, steps, seed=steps, eta=eta)


@pytest.mark.parametrize("name", ["lcm", "tcd"])
@pytest.mark.parametrize("steps", [1, 3, 6])
def test_distillation_grid_of_the_config(name, steps):
    """A config's own original_inference_steps and timestep_scaling set the grid and LCM's boundary condition."""
    config = SDXL_SCHEDULER | {"original_inference_steps": 8, "timestep_scaling": 0.05}
    schedule = SAMPLERS[name].schedule(SchedulerConfig.from_diffusers(config), steps, False)
    scheduler = diffusers_scheduler(name, config)
    scheduler.set_timesteps(steps)
    assert schedule.timesteps == scheduler.timesteps.tolist()
    _assert_same_trajectory(name, config, steps, seed=5)


def test_lcm_grid_and_its_limit():
    cfg = SchedulerConfig.from_diffusers(SD1_SCHEDULER)
    assert SAMPLERS["lcm"].schedule(cfg, 4, False).timesteps == [999.0, 759.0, 499.0, 259.0]
    with pytest.raises(InputError, match="lcm takes at most 50 steps"):
        SAMPLERS["lcm"].schedule(cfg, 51, False)


SAMPLE_PREDICTING = [name for name, spec in SAMPLERS.items() if "sample" in spec.predictions]


@pytest.mark.parametrize("name", SAMPLE_PREDICTING)
@pytest.mark.parametrize("steps", [1, 4])
def test_x0_prediction_matches_diffusers(name, steps):
    """prediction_type "sample" (the UNet predicts x0, as the 1-step SDXL-Lightning UNet does)."""
    assert set(SAMPLERS) - set(SAMPLE_PREDICTING) == {"pndm", "euler_a"}  # diffusers raises for these
    _assert_same_trajectory(name, SDXL_SCHEDULER | {"prediction_type": "sample"}, steps, seed=steps)


SPACED = [name for name, spec in SAMPLERS.items() if spec.spacing]


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("name", SPACED)
@pytest.mark.parametrize("steps", [1, 4, 7])
def test_timestep_spacing_matches_diffusers(name, spacing, steps):
    """Every sampler whose scheduler has `timestep_spacing` follows each of its values (trailing: the Turbo and
    Lightning models' spacing)."""
    assert set(SAMPLERS) - set(SPACED) == {"lcm", "tcd"}  # their grids ignore it, as diffusers' do
    config = SDXL_SCHEDULER | {"timestep_spacing": spacing}
    expected = diffusers_trajectory(name, config, steps, seed=steps)
    actual = ldm_trajectory(name, config, steps, seed=steps)
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert max_rel_err(a, e) < TRAJECTORY_TOL, f"step {i}"
