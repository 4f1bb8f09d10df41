"""CPU offload for small GPUs, applied to a loaded pipeline from outside its networks (design decision 5).

    enable_offload(pipe, "model")       # each network on the GPU only while it runs
    enable_offload(pipe, "sequential")  # each layer's weights on the GPU only for its own forward

diffusers' `enable_model_cpu_offload()` and `enable_sequential_cpu_offload()`, as hooks of our own.

The weights stay on the CPU (the offload device) and forward pre-hooks bring them to the execution device,
`pipe.device`, where the latents and the conditioning are made. The networks and the arithmetic are untouched:
an offloaded pipeline gives the image the same pipeline gives without offload on that device, bit for bit.

- "model": a call into a network that is not on the execution device moves that network there whole, and the
  network that was there back to the CPU (`.to()` semantics: what changed on the GPU, a LoRA merged or
  unmerged, goes back with it). A run moves the text encoder(s) in, then the UNet, which stays for every
  step, then the VAE (and the safety checker); the last one stays until another is needed. Peak GPU memory:
  the largest network (the UNet) and its activations. Cost: each network crosses the bus once a run.
- "sequential": each module that holds weights brings its own for its own forward and drops them after (the
  CPU copy is kept, so nothing travels back). Peak: the largest layer and the activations. Cost: every
  weight crosses the bus at every call: the whole UNet at every step.

Where the hooks go. Model mode hooks every module of a network, since calls enter networks below their
`forward` (the VAE's `encode`/`decode` call its encoder and decoder, tiled or not; textual inversion looks up
the CLIP token embedding directly); the network itself and its direct children also move tensor inputs to
the execution device (a hook costs microseconds a call; the UNet makes about a thousand calls a step).
Sequential mode hooks each module that owns parameters or buffers, with two kinds of exception named below:
modules whose forward reads a child's weight without calling the child (the CLIP embeddings add
`position_embedding.weight`) bring their whole subtree (a layer inside, run there or called directly, finds
its weights already there), and the safety checker's own concept embeddings (20 vectors, compared after its
forward returns) stay on the execution device. Code that needs to know where a network runs asks
`execution_device(network)`, not the device of its weights.

What does not combine: a CUDA graph replays reads of the weight addresses it captured, and compiled code is
specialised to the weights' devices; `enable_offload` refuses a pipeline with either (`ldm.speed.accelerate.accelerate`
with `compile=False, cuda_graph=False` is fine before it: fused projections and channels_last are layouts of
the weights). What is offloaded is `pipe.networks()`, the plain networks by name (the UNet without its speed
wrapper, whose compiled form and CUDA graphs `ldm.speed.accelerate.speed_wrapper` finds), and `pipe.device` is set
to the execution device: an SDXL base with its refiner (`ldm.pipelines.refiner.BaseWithRefiner`) is offloaded as
one through the same two, its two models' networks sharing one execution device and, in model mode, one resident
network at a time. A ControlNet, loaded when a run first names it (after the offload), is offloaded with the UNet
it runs beside (`offload_with`, which `ldm.pipelines.control.like_unet` calls): in model mode the two come in for
the denoising loop and go out after it together; in sequential mode its layers are hooked as the UNet's. An
IP-Adapter's key/value pairs and projection travel with the UNet the same way; its image encoder, which runs on its
own before the UNet, is offloaded as a network of its own (`offload_beside`): in model mode it comes in for the
encoding and goes out when the UNet comes in (`ldm.pipelines.image_prompts` calls both).

Sequential offload here copies from pageable memory, as diffusers does by default; pinned host memory would
make its copies faster and asynchronous, at the cost of pinning every weight.
"""

import sys
import weakref

import torch
from torch import Tensor, nn

from ldm.choices import OFFLOAD_MODES
from ldm.errors import InputError
from ldm.networks.clip import Embeddings, VisionEmbeddings
from ldm.networks.safety import SafetyChecker
from ldm.speed.accelerate import speed_wrapper

MOVED_WHOLE = (Embeddings, VisionEmbeddings)  # their forward reads position_embedding.weight (a child's) directly
KEPT_RESIDENT = (SafetyChecker,)  # check() reads its own concept embeddings after forward has returned

_offloaded: "weakref.WeakKeyDictionary[nn.Module, Offload]" = weakref.WeakKeyDictionary()


def execution_device(network: nn.Module) -> torch.device:
    """Where `network` computes: its offload's execution device, else the device of its weights."""
    offload = _offloaded.get(network)
    return offload.device if offload is not None else next(network.parameters()).device


def tensors(module: nn.Module, recurse: bool = True) -> list[Tensor]:
    """The parameters and buffers of `module` (each once)."""
    return [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]


def _compiled(module) -> bool:
    """Whether `module` is torch.compile's compiled form of a module (`OptimizedModule`). Looked up, not imported:
    importing torch._dynamo takes seconds, and before it is imported nothing has been compiled."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


def _fixed_to_its_device(network: nn.Module) -> str | None:
    """Why `network` cannot have its weights moved under it (a CUDA graph, compiled code), or None. A UNet is
    run by its speed wrapper (`ldm.speed.accelerate.TensorTimestep`), which holds both; a compiled VAE decoder is
    a submodule of the VAE."""
    wrapper = speed_wrapper(network)
    if wrapper is not None and wrapper.graphs is not None:
        return "its UNet step is replayed as a CUDA graph, which reads the weights where they were captured"
    if any(_compiled(module) for module in network.modules()) or (wrapper is not None and _compiled(wrapper.run)):
        return "it is compiled (torch.compile), and compiled code is specialised to where the weights are"
    return None


class Offload:
    """Hooks that keep the weights of `networks` on `offload_device` and bring them to `device` to run.

    `bring` and `park` are the two transfers (a subclass may keep the weights elsewhere); `log`, when kept,
    lists each move as ("in" | "out", name): networks in model mode, modules (`unet.conv_in`) in sequential.
    """

    def __init__(self, networks: dict[str, nn.Module], mode: str, device: torch.device | str,
                 offload_device: torch.device | str = "cpu", log: bool = False):
        if mode not in OFFLOAD_MODES:
            raise InputError(f"unknown offload mode {mode!r} (use {' or '.join(OFFLOAD_MODES)})", field="offload")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.networks, self.mode, self.device = networks, mode, device
        self.offload_device = torch.device(offload_device)
        self.resident: str | None = None  # model mode: the network on the execution device
        self.companions: dict[str, list[nn.Module]] = {}  # networks that run beside one of `networks` (`adopt`)
        self.present: set[int] = set()  # sequential mode: the ids of the tensors on the execution device
        self.log: list[tuple[str, str]] | None = [] if log else None
        self.handles: list = []

    @classmethod
    def enable(cls, pipe, mode: str = "model", device: torch.device | str | None = None,
               log: bool = False) -> "Offload":
        """Offload `pipe`'s networks (`pipe.networks()`) in place; its `device` becomes the execution device.
        `device`: default, the pipeline's own unless that is the CPU, else the CUDA device."""
        if device is None:
            device = pipe.device if pipe.device.type != "cpu" else "cuda" if torch.cuda.is_available() else None
            if device is None:
                raise InputError("offload moves weights between the CPU and a GPU, and there is no GPU here",
                                 field="offload")
        found = pipe.networks()
        for name, network in found.items():
            if network in _offloaded:
                raise InputError(f"{name} is offloaded already (disable_offload first)", field="offload")
            why = _fixed_to_its_device(network)
            if why is not None:
                raise InputError(f"{name} cannot be offloaded: {why}; offload an uncompiled pipeline without "
                                 "CUDA graphs (ldm.speed.accelerate.accelerate(pipe, compile=False, cuda_graph=False))",
                                 field="offload")
        offload = cls(found, mode, device, log=log)
        offload.attach()
        pipe.device = offload.device
        return offload

    # ------------------------------------------------------------------------------- the transfers

    def bring(self, t: Tensor) -> Tensor:
        """The data of parameter or buffer `t`, parked, on the execution device."""
        return t.data.to(self.device, non_blocking=True)

    def park(self, t: Tensor) -> Tensor:
        """The data of parameter or buffer `t` on the offload device."""
        return t.data.to(self.offload_device)

    def _record(self, direction: str, name: str) -> None:
        if self.log is not None:
            self.log.append((direction, name))

    def _inputs(self, value):
        """`value` (tensors, and tuples, lists and dicts of them) with every tensor on the execution device."""
        if isinstance(value, Tensor):
            return value.to(self.device) if value.device != self.device else value
        if isinstance(value, (tuple, list)):
            return type(value)(self._inputs(v) for v in value)
        if isinstance(value, dict):
            return {k: self._inputs(v) for k, v in value.items()}
        return value

    # --------------------------------------------------------------------------------------- hooks

    def attach(self) -> None:
        """Park every weight and hook every network."""
        for name, network in self.networks.items():
            self._attach(name, network)

    def add(self, name: str, network: nn.Module) -> None:
        """Offload `network`, loaded after the others (an IP-Adapter's image encoder), as one of them: `name`."""
        self.networks[name] = network
        self._attach(name, network)

    def _attach(self, name: str, network: nn.Module) -> None:
        for t in tensors(network):
            t.data = self.park(t)
        _offloaded[network] = self
        entries = {network, *network.children()}
        if self.mode == "model":
            self._hook_network(name, network, entries)
        else:
            for module in entries:
                self.handles.append(module.register_forward_pre_hook(self._move_inputs, with_kwargs=True))
            self._hook_units(name, network)

    def _move_inputs(self, module, args, kwargs):
        return self._inputs(args), self._inputs(kwargs)

    def _group(self, name: str) -> list[Tensor]:
        """The tensors that model mode moves as network `name`: its own and its companions'."""
        return [*tensors(self.networks[name]), *(t for c in self.companions.get(name, ()) for t in tensors(c))]

    def _hook_network(self, name: str, network: nn.Module, entries: set[nn.Module]) -> None:
        """Model mode: a call into any module of `network` (network `name` or one of its companions) brings the
        network `name` with its companions, and sends the resident one back."""
        def bring_network(module, args, kwargs):
            if self.resident != name:
                if self.resident is not None:
                    for t in self._group(self.resident):
                        t.data = self.park(t)
                    self._record("out", self.resident)
                for t in self._group(name):
                    t.data = self.bring(t)
                self.resident = name
                self._record("in", name)
            return self._move_inputs(module, args, kwargs) if module in entries else None

        for module in network.modules():
            self.handles.append(module.register_forward_pre_hook(bring_network, with_kwargs=True))

    def adopt(self, name: str, companion: nn.Module, label: str) -> None:
        """Offload `companion`, a network that runs beside network `name` (a ControlNet beside the UNet), with it:
        in model mode it comes in and goes out with that network (parked unless that one is resident now); in
        sequential mode its layers are hooked as any network's (their log names start with `label`)."""
        resident = self.mode == "model" and self.resident == name
        for t in tensors(companion) if not resident else []:
            t.data = self.park(t)
        self.companions.setdefault(name, []).append(companion)
        _offloaded[companion] = self
        entries = {companion, *companion.children()}
        if self.mode == "model":
            self._hook_network(name, companion, entries)
        else:
            for module in entries:
                self.handles.append(module.register_forward_pre_hook(self._move_inputs, with_kwargs=True))
            self._hook_units(label, companion)

    def _hook_units(self, name: str, network: nn.Module) -> None:
        for qualified, module in network.named_modules(prefix=name):
            if isinstance(module, KEPT_RESIDENT):
                for t in tensors(module, recurse=False):
                    t.data = self.bring(t)
                    self.present.add(id(t))
            elif isinstance(module, MOVED_WHOLE) or tensors(module, recurse=False):
                self._hook_unit(module, qualified, recurse=isinstance(module, MOVED_WHOLE))

    def _hook_unit(self, module: nn.Module, name: str, recurse: bool) -> None:
        """Bring the module's own tensors (`recurse`: its whole subtree's) for its forward, those not already
        there (a layer of a MOVED_WHOLE module runs inside it, or is called directly: textual inversion looks up
        the token embedding), and park them again after."""
        parked: list[list[tuple[Tensor, Tensor]]] = []  # a stack: one entry per call in progress

        def bring_own(module, args):
            own = [t for t in tensors(module, recurse) if id(t) not in self.present]
            parked.append([(t, t.data) for t in own])
            for t in own:
                t.data = self.bring(t)
                self.present.add(id(t))
            if own:
                self._record("in", name)

        def drop_own(module, args, output):
            own = parked.pop()
            for t, data in own:
                t.data = data
                self.present.discard(id(t))
            if own:
                self._record("out", name)

        self.handles.append(module.register_forward_pre_hook(bring_own))
        self.handles.append(module.register_forward_hook(drop_own, always_call=True))

    def remove(self) -> None:
        """Take the hooks away and bring every weight to the execution device (where `pipe.device` says)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for name, network in self.networks.items():
            for t in self._group(name) if name != self.resident else []:
                if id(t) not in self.present:
                    t.data = self.bring(t)
            for companion in [network, *self.companions.get(name, ())]:
                _offloaded.pop(companion, None)
        self.resident, self.present, self.companions = None, set(), {}


def enable_offload(pipe, mode: str = "model", device: torch.device | str | None = None,
                   log: bool = False) -> Offload:
    """Offload `pipe` ("model" or "sequential", see the module notes); returns the `Offload` (its `log` lists
    the moves when `log`). The pipeline's `device` becomes the execution device: pass `device` for another
    than its own (a pipeline loaded on the CPU to run on "cuda"). On the CPU itself this moves nothing."""
    return Offload.enable(pipe, mode, device, log)


def offload_with(network: nn.Module, companion: nn.Module, label: str = "controlnet") -> None:
    """Offload `companion`, a network loaded after `enable_offload` that runs beside `network` (a ControlNet beside
    the plain UNet), as `network` is offloaded (`Offload.adopt`): model mode moves the two together. Nothing where
    `network` is not offloaded, or `companion` is already."""
    offload = _offloaded.get(network)
    if offload is None or companion in _offloaded:
        return
    name = next((n for n, known in offload.networks.items() if known is network), None)
    if name is None:  # (`network` is itself a companion)
        return
    offload.adopt(name, companion, f"{label}{sum(map(len, offload.companions.values()))}")


def offload_beside(network: nn.Module, added: nn.Module, label: str) -> None:
    """Offload `added`, a network loaded after `enable_offload` that runs on its own in the pipeline of `network` (an
    IP-Adapter's image encoder, called before the UNet), as a network of its own in `network`'s offload
    (`Offload.add`, named `label`, after `network`'s prefix: `base.image_encoder` beside `base.unet`): model mode
    brings it for its call and sends it back when the next network comes in. Nothing where `network` is not
    offloaded, or `added` is already."""
    offload = _offloaded.get(network)
    if offload is None or added in _offloaded:
        return
    owner = next((n for n, known in offload.networks.items() if known is network), "")
    base = ".".join([*owner.split(".")[:-1], label])
    name, count = base, 1
    while name in offload.networks:  # (a second encoder: image_encoder1)
        name, count = f"{base}{count}", count + 1
    offload.add(name, added)


def offload_of(network: nn.Module) -> "Offload | None":
    """The offload `network` is under (its weights kept on `offload_device` between calls), or None."""
    return _offloaded.get(network)


def disable_offload(pipe) -> None:
    """Undo `enable_offload`: no hooks, every weight on the execution device."""
    seen = set()
    for network in pipe.networks().values():
        offload = _offloaded.get(network)
        if offload is not None and id(offload) not in seen:
            seen.add(id(offload))
            offload.remove()
