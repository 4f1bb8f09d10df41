"""Noise schedules: from a folder's `scheduler_config.json` to the σ grid a sampler walks.

A sampler chosen by name follows what diffusers does with `<SchedulerClass>.from_config(<the folder's
scheduler config>)`: fields present in the config are used, absent ones take that class's default
(`timestep_spacing` is "leading" for DDIM/PNDM but "linspace" for Euler; `set_alpha_to_one` is true
for DDIM but false for PNDM).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ldm.choices import TIMESTEP_SPACINGS
from ldm.errors import ConfigError, InputError

# what a UNet's output is: the noise ε, the velocity v (Salimans & Ho 2022), or the clean latents x0 ("sample")
PREDICTIONS = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class SchedulerConfig:
    """The fields of an official `scheduler/scheduler_config.json` (None: the sampler class's default)."""

    class_name: str = "PNDMScheduler"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    steps_offset: int = 0
    timestep_spacing: str | None = None
    set_alpha_to_one: bool | None = None
    clip_sample: bool | None = None
    clip_sample_range: float = 1.0
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False  # the folder's own choice; --karras asks for it with any σ-based sampler
    extra: dict = field(default_factory=dict, compare=False)  # the other fields, checked by the samplers they affect

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "SchedulerConfig":
        fields = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg and cfg[k] is not None and k != "extra"}
        fields["extra"] = {k: v for k, v in cfg.items() if k not in cls.__dataclass_fields__ and k[0] != "_"}
        if "_class_name" in cfg:
            fields["class_name"] = cfg["_class_name"]
        if "trained_betas" in fields:
            fields["trained_betas"] = tuple(fields["trained_betas"])
        for key, allowed in (("prediction_type", PREDICTIONS),
                             ("beta_schedule", ("linear", "scaled_linear")),
                             ("timestep_spacing", (*TIMESTEP_SPACINGS, None)),
                             ("interpolation_type", ("linear",))):
            if fields.get(key, getattr(cls, key)) not in allowed:
                raise ConfigError(f"scheduler config: {key}={fields[key]!r} is not supported")
        for key, unsupported in (("thresholding", True), ("rescale_betas_zero_snr", True),
                                 ("timestep_type", "continuous"),
                                 ("final_sigmas_type", "sigma_min")):
            if cfg.get(key) == unsupported:
                raise ConfigError(f"scheduler config: {key}={unsupported!r} is not supported yet")
        return cls(**fields)

    def alphas_cumprod(self) -> Tensor:
        """ᾱ_t for t = 0 … T-1, in float32 as diffusers computes it."""
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = torch.tensor(self.trained_betas, dtype=torch.float32)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float32) ** 2
        else:
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        return torch.cumprod(1.0 - betas, dim=0)


@dataclass(frozen=True)
class Schedule:
    """What a sampler walks and what the denoiser needs to evaluate the UNet along it."""

    sigmas: list[float]  # descending; the last is where sampling stops
    timesteps: list[float]  # the UNet timestep at each of sigmas[:-1]
    init_noise_sigma: float  # the initial latents are N(0, 1) noise times this
    # Where each step starts and lands, when that is not the grid point it is evaluated at and the next
    # one: diffusers' DDIM and PNDM step from t to t - T//steps whatever the spacing (PNDM's correction
    # from t + T//steps to t), and read the same variance-preserving latent at whatever t comes next.
    froms: list[float] | None = None
    lands: list[float] | None = None
    # The number of inference steps, when the list of UNet calls is longer (PNDM evaluates one step twice).
    steps: int | None = None
    # Rebuilds the schedule started at call index k, for samplers whose steps depend on where they start.
    restart: Callable[[int], "Schedule"] | None = field(default=None, compare=False, repr=False)
    # A part of a longer schedule: that schedule's σ grid and where this part starts in it (LMS needs them).
    grid: list[float] | None = None
    offset: int = 0
    # The training grid σ_t = √((1-ᾱ_t)/ᾱ_t), t = 0 … T-1, where the denoiser places a σ that is not one of
    # `sigmas` (k-diffusion's `DiscreteSchedule`); None for a bare list of σ and timesteps.
    training_sigmas: np.ndarray | None = field(default=None, compare=False, repr=False)
    # LCM: each step's boundary condition (c_skip, c_out), from its timestep (`boundary_condition`)
    boundary: list[tuple[float, float]] | None = None
    # TCD: the training timestep each step lands on (0 after the last), which its γ-step goes back from
    lands_at: list[int] | None = None

    def _part(self, start: int, stop: int | None = None) -> "Schedule":
        """Steps start…stop-1 (and the σ they end on)."""
        if stop is None and self.restart is not None:
            return self.restart(start)
        end = None if stop is None else stop + 1

        def cut(values):
            return None if values is None else values[start:stop]

        return Schedule(self.sigmas[start:end], self.timesteps[start:stop], self.init_noise_sigma,
                        cut(self.froms), cut(self.lands), grid=self.grid or self.sigmas, offset=self.offset + start,
                        training_sigmas=self.training_sigmas, boundary=cut(self.boundary), lands_at=cut(self.lands_at))

    def from_strength(self, strength: float) -> "Schedule":
        """The tail that image-to-image runs: the last min(int(steps·strength), steps) steps (diffusers'
        rule), starting from the init latents noised to the first σ kept."""
        steps = self.steps or len(self.timesteps)
        keep = min(int(steps * strength), steps)
        if keep < 1:
            raise InputError(f"strength {strength} × {steps} steps leaves no step to run; raise --strength or --steps")
        return self._part(steps - keep)

    def until(self, end: float, num_train_timesteps: int) -> "Schedule":
        """The head a base model runs before handing off (diffusers' `denoising_end`): the steps whose
        timestep is at least round(T·(1 - end))."""
        cutoff = int(round(num_train_timesteps - end * num_train_timesteps))
        keep = sum(t >= cutoff for t in self.timesteps)
        if keep < 1:
            raise InputError(f"denoising end {end} leaves no step to run")
        return self._part(0, keep)

    def since(self, start: float, num_train_timesteps: int) -> "Schedule":
        """The tail a refiner runs after a hand-off (diffusers' `denoising_start`): the steps whose timestep
        is below round(T·(1 - start))."""
        cutoff = int(round(num_train_timesteps - start * num_train_timesteps))
        keep = sum(t < cutoff for t in self.timesteps)
        if keep < 1:
            raise InputError(f"denoising start {start} leaves no step to run")
        return self._part(len(self.timesteps) - keep)

    def to_latents(self, x: Tensor) -> Tensor:
        """The sampler's σ-space result as the variance-preserving latents the VAE decodes."""
        return x / (1.0 + self.sigmas[-1] ** 2) ** 0.5


def _spacing(cfg: SchedulerConfig, default: str) -> str:
    return cfg.timestep_spacing or default


def discrete_timesteps(cfg: SchedulerConfig, steps: int) -> np.ndarray:
    """Integer timesteps of DDIM/PNDM, descending, with their class default spacing ("leading")."""
    T, spacing = cfg.num_train_timesteps, _spacing(cfg, "leading")
    if spacing == "leading":
        t = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64) + cfg.steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    else:
        t = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    return t


def sigma_of(alphas_cumprod: Tensor, t) -> float:
    a = float(alphas_cumprod[int(t)])
    return ((1.0 - a) / a) ** 0.5


def final_sigma(cfg: SchedulerConfig, alphas_cumprod: Tensor, set_alpha_to_one_default: bool) -> float:
    """Where DDIM and PNDM stop: ᾱ = 1 (σ = 0) with `set_alpha_to_one`, else ᾱ_0."""
    one = cfg.set_alpha_to_one if cfg.set_alpha_to_one is not None else set_alpha_to_one_default
    return 0.0 if one else sigma_of(alphas_cumprod, 0)


def discrete_schedule(cfg: SchedulerConfig, steps: int, set_alpha_to_one_default: bool) -> Schedule:
    """DDIM: the integer timestep grid, then the final σ."""
    ac = cfg.alphas_cumprod()
    t = discrete_timesteps(cfg, steps)
    final = final_sigma(cfg, ac, set_alpha_to_one_default)
    sigmas = [sigma_of(ac, ti) for ti in t] + [final]
    ratio = cfg.num_train_timesteps // steps  # diffusers steps from t to t - ratio, on the grid or not
    lands = [sigma_of(ac, ti - ratio) if ti - ratio >= 0 else final for ti in t]
    return Schedule(sigmas, [float(ti) for ti in t], (1.0 + sigmas[0] ** 2) ** 0.5,
                    lands=None if lands == sigmas[1:] else lands, training_sigmas=_training_sigmas(cfg))


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """The σ grid of Karras et al. 2022 (eq. 5): uniform in σ^(1/ρ) from σ_max down to σ_min."""
    ramp = np.linspace(0, 1, steps)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of σ values, by linear interpolation in log σ (k-diffusion, diffusers)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _training_sigmas(cfg: SchedulerConfig) -> np.ndarray:
    """σ_t = √((1-ᾱ_t)/ᾱ_t) for t = 0 … T-1 (float32, ascending)."""
    ac = cfg.alphas_cumprod()
    return (((1 - ac) / ac) ** 0.5).numpy()


def expect(cfg: SchedulerConfig, sampler: str, **defaults) -> None:
    """Refuse scheduler-config settings that change `sampler` in diffusers and that ldm does not implement."""
    for key, allowed in defaults.items():
        value = cfg.extra.get(key)
        if value is not None and value not in allowed:
            raise ConfigError(f"scheduler config: {key}={value!r} changes {sampler} in diffusers and ldm does not "
                              f"implement it; remove it or pick another sampler")


SIGMA_GRIDS = {"use_exponential_sigmas": (False,), "use_beta_sigmas": (False,), "use_flow_sigmas": (False,)}


def euler_schedule(cfg: SchedulerConfig, steps: int, karras: bool = False) -> Schedule:
    """EulerDiscreteScheduler (and its ancestral and Heun siblings): σ interpolated linearly at fractional
    timesteps, or Karras σ between the ends of that grid at their log-σ timesteps; then 0."""
    expect(cfg, "the Euler-family samplers", **SIGMA_GRIDS)
    T, spacing = cfg.num_train_timesteps, _spacing(cfg, "linspace")
    if spacing == "linspace":
        t = np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        t = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.float32) + cfg.steps_offset
    else:
        t = np.arange(T, 0, -T / steps).round().astype(np.float32) - 1
    all_sigmas = _training_sigmas(cfg)
    sigmas = np.interp(t, np.arange(T), all_sigmas)
    if karras:
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), steps)
        t = sigma_to_t(sigmas, np.log(all_sigmas))
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    top = float(sigmas.max())
    init = top if spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
    return Schedule([float(s) for s in sigmas], [float(ti) for ti in t.astype(np.float32)], init,
                    training_sigmas=all_sigmas)


def dpm_schedule(cfg: SchedulerConfig, steps: int, karras: bool = False) -> Schedule:
    """DPMSolverMultistepScheduler's grid, for DPM-Solver++(2M) as ldm implements it."""
    expect(cfg, "DPM-Solver++", solver_order=(2,), solver_type=("midpoint",), use_lu_lambdas=(False,),
           algorithm_type=("dpmsolver++", "sde-dpmsolver++"), variance_type=(None,), **SIGMA_GRIDS)
    return multistep_grid(cfg, steps, karras)


def unipc_schedule(cfg: SchedulerConfig, steps: int, karras: bool = False) -> Schedule:
    """UniPCMultistepScheduler's grid (the same as DPM-Solver's), for UniPC as ldm implements it."""
    expect(cfg, "UniPC", solver_order=(2,), solver_type=("bh2",), predict_x0=(True,), disable_corrector=([],),
           **SIGMA_GRIDS)
    return multistep_grid(cfg, steps, karras)


def multistep_grid(cfg: SchedulerConfig, steps: int, karras: bool = False) -> Schedule:
    """DPMSolverMultistepScheduler: integer timesteps (its own spacing rules, "linspace" by default) at
    their exact σ, or Karras σ over the whole training range at rounded log-σ timesteps; then 0."""
    T, spacing = cfg.num_train_timesteps, _spacing(cfg, "linspace")
    if spacing == "linspace":
        t = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        t = (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
    else:
        t = np.arange(T, 0, -T / steps).round().astype(np.int64) - 1
    all_sigmas = _training_sigmas(cfg)
    if karras:
        sigmas = karras_sigmas(float(all_sigmas[0]), float(all_sigmas[-1]), steps)
        t = sigma_to_t(sigmas, np.log(all_sigmas)).round()
    else:
        sigmas = np.interp(t, np.arange(T), all_sigmas)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    # diffusers feeds DPM-Solver the variance-preserving latents (init_noise_sigma 1)
    return Schedule([float(s) for s in sigmas], [float(ti) for ti in t], (1.0 + float(sigmas[0]) ** 2) ** 0.5,
                    training_sigmas=all_sigmas)


def ddim_schedule(cfg: SchedulerConfig, steps: int, karras: bool = False) -> Schedule:
    """DDIMScheduler's grid (its class default `set_alpha_to_one` is true)."""
    if cfg.clip_sample is not False:
        raise ConfigError("DDIM with clip_sample (x0 clipped to [-1, 1], the DDIMScheduler default when the "
                          "config omits it) is not supported; the official SD configs set clip_sample: false")
    return discrete_schedule(cfg, steps, set_alpha_to_one_default=True)


def pndm_schedule(cfg: SchedulerConfig, steps: int, karras: bool = False) -> Schedule:
    """PNDMScheduler with `skip_prk_steps` (its class default `set_alpha_to_one` is false): one UNet call per
    entry of diffusers' list, whose second timestep comes twice (prediction, then correction)."""
    ac = cfg.alphas_cumprod()
    t = [int(ti) for ti in discrete_timesteps(cfg, steps)]
    calls = t[:2] + t[1:] if steps > 1 else t
    final = final_sigma(cfg, ac, set_alpha_to_one_default=False)
    ratio = cfg.num_train_timesteps // steps
    training_sigmas = _training_sigmas(cfg)

    def restart(start: int) -> Schedule:
        """diffusers' step rule on the calls from `start` on: its counter starts again at the first of them."""
        ts = calls[start:]
        froms = [sigma_of(ac, tc + ratio if c == 1 else tc) for c, tc in enumerate(ts)]
        lands = [sigma_of(ac, tc) if c == 1 else sigma_of(ac, tc - ratio) if tc >= ratio else final
                 for c, tc in enumerate(ts)]
        sigmas = [sigma_of(ac, tc) for tc in ts] + [final]
        return Schedule(sigmas, [float(tc) for tc in ts], (1.0 + sigmas[0] ** 2) ** 0.5, froms, lands, steps,
                        restart, training_sigmas=training_sigmas)

    return restart(0)



# ------------------------------------------------------------------------------- few-step (consistency) models


def consistency_timesteps(cfg: SchedulerConfig, steps: int, sampler: str) -> np.ndarray:
    """LCMScheduler's (and TCDScheduler's) timesteps: the distillation grid of `original_inference_steps` (50 by
    default) points t = k·i - 1 (k = T // that), descending, taken at floor(linspace(0, len, steps)) indices
    (4 steps of 50: 999, 759, 499, 259)."""
    original = int(cfg.extra.get("original_inference_steps", 50))
    if not 1 <= original <= cfg.num_train_timesteps:
        raise ConfigError(f"scheduler config: original_inference_steps={original} must be from 1 to "
                          f"{cfg.num_train_timesteps}")
    if steps > original:
        raise InputError(f"{sampler} takes at most {original} steps on this model (its distillation grid: "
                         f"original_inference_steps), got {steps}", field="steps")
    grid = (np.arange(1, original + 1) * (cfg.num_train_timesteps // original) - 1)[::-1]
    return grid[np.floor(np.linspace(0, len(grid), steps, endpoint=False)).astype(np.int64)]


def boundary_condition(t: int, timestep_scaling: float) -> tuple[float, float]:
    """LCM's consistency-model parametrisation at timestep t (Song et al. 2023, eq. 3; σ_data = 0.5):
    c_skip = σ_d²/(s² + σ_d²), c_out = s/√(s² + σ_d²) with s = t·`timestep_scaling`, in float32 as diffusers'
    `get_scalings_for_boundary_condition_discrete` computes them."""
    scaled = torch.tensor(t) * timestep_scaling
    return float(0.25 / (scaled**2 + 0.25)), float(scaled / (scaled**2 + 0.25) ** 0.5)


def _consistency_config(cfg: SchedulerConfig, sampler: str) -> None:
    if cfg.clip_sample:
        raise ConfigError(f"{sampler} with clip_sample (x0 clipped to [-1, 1]) is not supported; the official "
                          f"LCM/TCD configs set clip_sample: false")
    expect(cfg, sampler, thresholding=(False,))


def lcm_schedule(cfg: SchedulerConfig, steps: int, karras: bool = False) -> Schedule:
    """LCMScheduler: the distillation grid's timesteps at their σ, each with its boundary condition, then σ = 0
    (the last step returns its denoised estimate)."""
    _consistency_config(cfg, "LCM")
    ac, t = cfg.alphas_cumprod(), consistency_timesteps(cfg, steps, "lcm")
    sigmas = [sigma_of(ac, ti) for ti in t] + [0.0]
    scaling = float(cfg.extra.get("timestep_scaling", 10.0))
    return Schedule(sigmas, [float(ti) for ti in t], (1.0 + sigmas[0] ** 2) ** 0.5,
                    training_sigmas=_training_sigmas(cfg), boundary=[boundary_condition(ti, scaling) for ti in t])


def tcd_schedule(cfg: SchedulerConfig, steps: int, karras: bool = False) -> Schedule:
    """TCDScheduler: LCM's timesteps at their σ; the last step lands on t = 0 (σ_0, not 0: TCD returns the
    sample its γ-step noises back to ᾱ_0)."""
    _consistency_config(cfg, "TCD")
    ac, t = cfg.alphas_cumprod(), consistency_timesteps(cfg, steps, "tcd")
    sigmas = [sigma_of(ac, ti) for ti in t] + [sigma_of(ac, 0)]
    return Schedule(sigmas, [float(ti) for ti in t], (1.0 + sigmas[0] ** 2) ** 0.5,
                    training_sigmas=_training_sigmas(cfg), lands_at=[int(ti) for ti in t[1:]] + [0])
