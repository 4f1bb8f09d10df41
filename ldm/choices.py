"""The words users type — sampler names, prompt syntaxes, emphasis modes, response forms — and what A1111
calls them.

Importable without torch, so that the command line parses (and `ldm --help` answers) at once; the modules
that implement these options take their names from here.
"""

# sampler name → AUTOMATIC1111's name of it (written into the infotext, read back by --from-png)
SAMPLER_LABELS = {"pndm": "PLMS", "ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun",
                  "lms": "LMS", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "unipc": "UniPC",
                  "lcm": "LCM", "tcd": "TCD"}  # A1111 has LCM; TCD is Forge's and ComfyUI's name
# AUTOMATIC1111's samplers ldm does not have → the nearest ones it has (the same kind of solver: single-step
# second-order → Heun, ancestral → Euler a, SDE → DPM++ 2M SDE); `--from-png` names them instead of guessing
NEAREST_SAMPLERS = {"DPM++ SDE": ("dpmpp_2m_sde", "dpmpp_2m"), "DPM++ 2M SDE Heun": ("dpmpp_2m_sde", "heun"),
                    "DPM++ 2S a": ("euler_a", "dpmpp_2m_sde"), "DPM++ 3M SDE": ("dpmpp_2m_sde",),
                    "DPM2": ("heun", "dpmpp_2m"), "DPM2 a": ("euler_a", "dpmpp_2m_sde"), "DPM fast": ("dpmpp_2m",),
                    "DPM adaptive": ("dpmpp_2m",), "Restart": ("heun",), "DDIM CFG++": ("ddim",)}
# A1111 1.10's schedule labels (modules/sd_schedulers.py: `schedulers`, with the alias SGMUniform), which its
# samplers' labels before 1.9 ended with ("DPM++ 2M Karras"); ldm has Automatic and Karras
A1111_SCHEDULES = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "SGMUniform",
                   "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")
# what A1111 ≥ 1.9 runs for `Schedule type: Automatic`: the sampler's own schedule (modules/sd_samplers_kdiffusion.py:
# `samplers_k_diffusion` options' "scheduler", taken by KDiffusionSampler.get_sigmas), of the samplers ldm has
A1111_AUTOMATIC_SCHEDULES = {"DPM++ 2M": "Karras", "DPM++ 2M SDE": "Exponential"}
# the samplers whose diffusers scheduler takes Karras σ (`use_karras_sigmas`)
KARRAS_SAMPLERS = ("euler", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde", "unipc")

# how the timesteps of a run are spaced over the training range (diffusers' `timestep_spacing`; Lin et al. 2023,
# Table 2): "trailing" starts at the last training timestep, as the Turbo and Lightning models are sampled
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")

SYNTAXES = ("a1111", "plain")

# the dtypes users name (`ldm.loading.components.DTYPES` maps them to torch's); "auto" is chosen by device
DTYPE_NAMES = ("fp32", "fp16", "bf16")

# the hires fix's upscalers → A1111's names (the infotext's `Hires upscaler`): the latent ones interpolate the
# first pass's latents (torch `interpolate` mode, antialias), the others resize its decoded images with PIL
HIRES_UPSCALERS = {"latent": "Latent", "latent-antialiased": "Latent (antialiased)",
                   "latent-bicubic": "Latent (bicubic)", "latent-bicubic-antialiased": "Latent (bicubic antialiased)",
                   "latent-nearest": "Latent (nearest)", "latent-nearest-exact": "Latent (nearest-exact)",
                   "lanczos": "Lanczos", "nearest": "Nearest"}
HIRES_MAX_SCALE = 4.0  # A1111's slider
# A1111's emphasis modes: "Original" (weights, then the chunk's mean restored), "No norm" (weights only),
# "None" (brackets read literally; long prompts are still chunked)
EMPHASES = {"original": "Original", "no-norm": "No norm", "none": "None"}

# ControlNet units' control modes → A1111's (sd-webui-controlnet) names: "prompt" and "control" weight the
# residuals softly (0.825^(12 − i)), "control" also keeps the unconditional half of guidance free of control
CONTROL_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                 "control": "ControlNet is more important"}
CONTROL_MAX_WEIGHT = 2.0  # sd-webui-controlnet's slider
# how a unit's control image is fitted to the output's size → sd-webui-controlnet's names (the infotext's `Resize
# Mode`): stretched (diffusers' resize: Lanczos), scaled to cover it and centre-cropped, scaled to fit inside it and
# padded with its border's median colour (these two resampled as sd-webui-controlnet resamples)
CONTROL_RESIZE_MODES = {"just-resize": "Just Resize", "crop-and-resize": "Crop and Resize",
                        "resize-and-fill": "Resize and Fill"}
# the preprocessors that need no model (a control image made from an ordinary one) → sd-webui-controlnet's module
# names (the infotext's `Module`); `ldm.pipelines.preprocess` has their parameters
CONTROL_PREPROCESSORS = {"canny": "canny", "invert": "invert", "threshold": "threshold", "tile": "tile_resample",
                         "blur": "blur_gaussian", "shuffle": "shuffle"}
# their parameters, in order sd-webui-controlnet's threshold A and threshold B (its sliders): `ldm preprocess`'s
# option, what it is, default, minimum, maximum, whole numbers only
CONTROL_PREPROCESSOR_PARAMS = {"canny": (("low", "low threshold", 100, 1, 255, True),
                                         ("high", "high threshold", 200, 1, 255, True)),
                               "threshold": (("value", "binarization threshold", 127, 0, 255, False),),
                               "tile": (("rate", "down-sampling rate", 1.0, 1.0, 8.0, False),),
                               "blur": (("sigma", "sigma", 9.0, 0.01, 64.0, False),)}
# the processor resolution (the short side the image is scaled to first): default, minimum, maximum
# (sd-webui-controlnet's slider), and the preprocessors that work at it (shuffle always works at 512, invert and
# tile at the image's size)
CONTROL_PROCESSOR_RES = (512, 64, 2048)
CONTROL_RESOLUTION_PREPROCESSORS = ("canny", "threshold", "blur")

# the scoring adapter's response forms: one object per image (the SD 2.1 / SDXL / inpainting cards), or the
# SD 1.5 / 1.4 cards' single object of lists
FORMS = ("rows", "sd15", "sd14")

# --offload: each network brought to the GPU while it runs (diffusers' enable_model_cpu_offload), or each layer
# (enable_sequential_cpu_offload)
OFFLOAD_MODES = ("model", "sequential")
# --vae-tiling as `enable_vae_tiling` takes it: always, or only where the whole-image pass would not fit
VAE_TILING_MODES = ("on", "auto")
# `ldm bench --mode`: how ldm runs (eager, the CUDA graph, compiled, max-autotune, offloaded)
BENCH_MODES = ("eager", "graph", "compile", "max", "model-offload", "sequential-offload")
