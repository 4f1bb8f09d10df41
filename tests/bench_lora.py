"""Benchmark (a script, not a test): loading + merging a kohya SDXL LoRA into a full-size SDXL base (UNet and both
text towers, official config sizes, constant weights), then unloading it.

    python tests/bench_lora.py                  # fp16 networks, rank 21 (a 150 MB fp16 file)
    python tests/bench_lora.py --dtype fp32 --towers-only

The networks are built on the meta device and materialised with `to_empty` (no random init); the LoRA has
kohya's SDXL layout (LDM/SGM UNet names, lora_te1_/lora_te2_) over kohya's default targets: every attention,
feed-forward and projection linear of the UNet's transformers and the towers' attention and MLP linears. The
full SDXL in fp32 (13.6 GB) plus the originals kept for unloading (11.6 GB) does not fit a 23 GB machine:
`--towers-only` times fp32 on the text towers alone.
"""

import argparse
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from lora_files import ATTENTION, TEXT, modules  # noqa: E402

from ldm.adapters.lora import load_lora, unload_loras  # noqa: E402
from ldm.loading.single_file import unet_rules  # noqa: E402
from ldm.networks.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from ldm.networks.unet import UNet, UNetConfig  # noqa: E402

SDXL_UNET = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
             "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2,
             "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
             "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "hidden_act": "quick_gelu", "projection_dim": 768}
CLIP_G = {"architectures": ["CLIPTextModelWithProjection"], "hidden_size": 1280, "intermediate_size": 5120,
          "num_attention_heads": 20, "num_hidden_layers": 32, "hidden_act": "gelu", "projection_dim": 1280}


def build(make, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device("meta"):
        module = make()
    module = module.to(dtype).to_empty(device="cpu").eval().requires_grad_(False)
    for p in module.parameters():
        p.fill_(0.01)  # touch every page, as loaded weights would be resident
    return module


def write_lora(path: Path, nets: dict, rank: int, unet_cfg: UNetConfig | None) -> tuple[int, int]:
    """Write the LoRA; returns (modules, parameters of the weights it touches)."""
    from safetensors.torch import save_file

    ldm = {}
    if unet_cfg is not None:
        ldm = {r.ours.removesuffix(".weight"): r.theirs.removesuffix(".weight")
               for r in unet_rules(unet_cfg, prefix="") if r.ours.endswith(".weight")}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    g = torch.Generator().manual_seed(0)
    tensors, touched = {}, 0
    for component, net in nets.items():
        for name, shape in modules(net, ATTENTION if component == "unet" else TEXT).items():
            touched += shape[0] * shape[1]
            key = prefixes[component] + ldm.get(name, name).replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = (torch.randn(rank, shape[1], generator=g) * 0.01).half()
            tensors[f"{key}.lora_up.weight"] = (torch.randn(shape[0], rank, generator=g) * 0.01).half()
            tensors[f"{key}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    save_file(tensors, str(path))
    return len(tensors) // 3, touched


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=["fp16", "fp32", "bf16"], default="fp16")
    parser.add_argument("--rank", type=int, default=21)
    parser.add_argument("--towers-only", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    unet_cfg = None if args.towers_only else UNetConfig.from_diffusers(SDXL_UNET)
    t = time.perf_counter()
    nets = {"text_encoder": build(lambda: CLIPTextModel(CLIPTextConfig.from_transformers(CLIP_L)), dtype),
            "text_encoder_2": build(lambda: CLIPTextModel(CLIPTextConfig.from_transformers(CLIP_G)), dtype)}
    if unet_cfg is not None:
        nets["unet"] = build(lambda: UNet(unet_cfg), dtype)
    params = sum(p.numel() for n in nets.values() for p in n.parameters())
    print(f"built {', '.join(nets)}: {params / 1e9:.2f} B parameters in {args.dtype} ({time.perf_counter() - t:.0f} s)")
    unet = nets.get("unet", torch.nn.Identity())
    towers = {k: v for k, v in nets.items() if k != "unet"}
    # the surface ldm.adapters.lora reads of a pipeline: its networks and the declared LoRA fields
    pipe = types.SimpleNamespace(unet=unet, **towers, loras=[], lora_originals={},
                                 networks=lambda: {"unet": unet, **towers})
    if unet_cfg is None:  # a stand-in UNet without targets, so that the LoRA's towers are what is timed
        pipe.unet.config = UNetConfig()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sdxl-lora.safetensors"
        count, touched = write_lora(path, nets, args.rank, unet_cfg)
        print(f"LoRA: {count} modules, rank {args.rank}, {path.stat().st_size / 1e6:.0f} MB; the weights it touches: "
              f"{touched / 1e9:.2f} B parameters, {2 * args.rank * touched / 1e9:.0f} GFLOP of deltas")
        loads, unloads = [], []
        for _ in range(args.repeats + 1):
            t = time.perf_counter()
            lora = load_lora(pipe, path, 0.8)
            loads.append(time.perf_counter() - t)
            t = time.perf_counter()
            unload_loras(pipe)
            unloads.append(time.perf_counter() - t)
            assert lora.keys == count
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"load + merge: first {loads[0]:.2f} s (fresh memory for the originals, the LDM name table), then median "
          f"{statistics.median(loads[1:]):.2f} s; unload: median {statistics.median(unloads[1:]):.2f} s")


if __name__ == "__main__":
    main()
