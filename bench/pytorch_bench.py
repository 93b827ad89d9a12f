#!/usr/bin/env python3
"""The PyTorch side of `convergence bench`: the same workloads in PyTorch eager, built from
diffusers' own classes with the same configs and shapes, on random weights.

    bench/.venv/bin/python bench/pytorch_bench.py WORKLOAD [--dtype f32|bf16] [--threads N]
        [--iters N] [--warmup N] [--json]
    bench/.venv/bin/python bench/pytorch_bench.py --list

Prints the median seconds per iteration and the process's peak resident memory; with --json one
object with the fields `convergence bench --json` prints (workload, dtype, threads, iters,
median_s, min_s, peak_rss_bytes). See bench/README.md for the setup.
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

WORKLOADS = [
    "dit-xl-2-forward",
    "dit-s-2-train-step",
    "fashion-train-step",
    "fashion-sample-32",
    "sd3-joint-block",
    "flux-single-block",
    "linear-256x1152x4608",
    "linear-4096x384x1536",
]

ROOT = Path(__file__).resolve().parent.parent
FASHION_DIR = ROOT / "models" / "fashion-dit"

# The paper's DiT family at 256x256 (latent 4x32x32, 1000 classes, learned sigma: 8 output
# channels), as `DiTConfig::preset` builds it: (depth, hidden, heads).
DIT_FAMILY = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}


def dit_preset(size, patch):
    depth, hidden, heads = DIT_FAMILY[size]
    return dict(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=4,
        out_channels=8,
        num_layers=depth,
        sample_size=32,
        patch_size=patch,
        num_embeds_ada_norm=1000,
    )


def fashion_config():
    cfg = json.loads((FASHION_DIR / "transformer" / "config.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def dit(cfg, dtype):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**cfg).to(dtype)


def class_labels(cfg, batch):
    import torch

    return torch.arange(batch) % cfg.get("num_embeds_ada_norm", 1000)


def dit_forward(cfg, batch, dtype):
    import torch

    model = dit(cfg, dtype).eval()
    s = cfg["sample_size"]
    x = torch.randn(batch, cfg["in_channels"], s, s).to(dtype)
    t = torch.full((batch,), 500.0)
    labels = class_labels(cfg, batch)

    def step():
        with torch.inference_mode():
            model(x, timestep=t, class_labels=labels).sample

    return step


def train_step(cfg, batch, dtype):
    """Rectified flow as train::Objective computes it (logit-normal t, x_t = (1 - t) x0 + t eps,
    target eps - x0, the model sees 1000 t, MSE on the first C output channels), the loss read
    back, backward, global-norm clipping at 1 and torch.optim.AdamW (lr 1e-4, no weight decay)."""
    import torch

    model = dit(cfg, dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    c, s = cfg["in_channels"], cfg["sample_size"]
    x0 = torch.randn(batch, c, s, s).clamp(-1, 1).to(dtype)
    labels = class_labels(cfg, batch)

    def step():
        t = torch.sigmoid(torch.randn(batch))
        eps = torch.randn(x0.shape).to(dtype)
        tt = t.view(batch, 1, 1, 1).to(dtype)
        x_t = (1 - tt) * x0 + tt * eps
        pred = model(x_t, timestep=t * 1000, class_labels=labels).sample[:, :c]
        loss = (pred - (eps - x0)).square().mean()
        value = loss.item()
        if value != value:
            raise RuntimeError(f"loss is {value}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def dit_sample(cfg, batch, steps, guidance, dtype):
    """Euler flow-matching sampling with classifier-free guidance on the batch [uncond, cond],
    as Convergence's DiT pipeline runs it."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = dit(cfg, dtype).eval()
    sched_cfg = json.loads((FASHION_DIR / "scheduler" / "scheduler_config.json").read_text())
    scheduler = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in sched_cfg.items() if not k.startswith("_")})
    s = cfg["sample_size"]
    noise = torch.randn(batch, cfg["in_channels"], s, s).to(dtype)
    labels = class_labels(cfg, batch)
    null = torch.full((batch,), cfg["num_embeds_ada_norm"])
    both = torch.cat([null, labels])

    def step():
        with torch.inference_mode():
            scheduler.set_timesteps(steps)
            x = noise
            for t in scheduler.timesteps:
                out = model(torch.cat([x, x]), timestep=t.expand(2 * batch), class_labels=both).sample
                u, c = out.chunk(2)
                v = u + guidance * (c - u)
                x = scheduler.step(v, t, x).prev_sample

    return step


def joint_block(heads, head_dim, image, text, dtype):
    """One SD3-medium MMDiT block (diffusers' JointTransformerBlock, no qk-norm), batch 1."""
    import torch
    from diffusers.models.attention import JointTransformerBlock

    dim = heads * head_dim
    block = JointTransformerBlock(dim=dim, num_attention_heads=heads, attention_head_dim=head_dim).to(dtype).eval()
    x = torch.randn(1, image, dim).to(dtype)
    context = torch.randn(1, text, dim).to(dtype)
    temb = torch.randn(1, dim).to(dtype)

    def step():
        with torch.inference_mode():
            block(hidden_states=x, encoder_hidden_states=context, temb=temb)

    return step


def flux_single_block(heads, head_dim, side, text, dtype):
    """One FLUX.1 single-stream block (diffusers' FluxSingleTransformerBlock) with the model's
    RoPE over [text, image] tokens of a side x side latent (packed 2x2), batch 1."""
    import torch
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed, FluxSingleTransformerBlock

    dim = heads * head_dim
    block = FluxSingleTransformerBlock(dim=dim, num_attention_heads=heads, attention_head_dim=head_dim)
    block = block.to(dtype).eval()
    g = side // 2
    img_ids = torch.zeros(g, g, 3)
    img_ids[..., 1] += torch.arange(g)[:, None]
    img_ids[..., 2] += torch.arange(g)[None, :]
    ids = torch.cat([torch.zeros(text, 3), img_ids.reshape(g * g, 3)])
    rope = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    x = torch.randn(1, g * g, dim).to(dtype)
    context = torch.randn(1, text, dim).to(dtype)
    temb = torch.randn(1, dim).to(dtype)

    def step():
        with torch.inference_mode():
            block(hidden_states=x, encoder_hidden_states=context, temb=temb, image_rotary_emb=rope)

    return step


def linear(rows, inp, out, dtype):
    """One nn.Linear with bias, x [rows, inp]: the matrix product alone."""
    import torch

    layer = torch.nn.Linear(inp, out).to(dtype).eval()
    x = torch.randn(rows, inp).to(dtype)

    def step():
        with torch.inference_mode():
            layer(x)

    return step


def build(name, dtype):
    if name == "dit-xl-2-forward":
        return dit_forward(dit_preset("xl", 2), 1, dtype)
    if name == "dit-s-2-train-step":
        return train_step(dit_preset("s", 2), 16, dtype)
    if name == "fashion-train-step":
        return train_step(fashion_config(), 64, dtype)
    if name == "fashion-sample-32":
        return dit_sample(fashion_config(), 10, 32, 2.0, dtype)
    if name == "sd3-joint-block":
        return joint_block(24, 64, 1024, 77, dtype)
    if name == "flux-single-block":
        return flux_single_block(24, 128, 64, 512, dtype)
    if name.startswith("linear-"):
        rows, inp, out = (int(v) for v in name.removeprefix("linear-").split("x"))
        return linear(rows, inp, out, dtype)
    raise SystemExit(f"error: unknown workload `{name}` (one of: {', '.join(WORKLOADS)})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workload", nargs="?")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    p.add_argument("--threads", type=int, help="intra-op threads (default: torch's default)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args()
    if a.list:
        print("\n".join(WORKLOADS))
        return
    if a.workload is None:
        p.error("no workload given (see --list)")
    if a.workload not in WORKLOADS:
        raise SystemExit(f"error: unknown workload `{a.workload}` (one of: {', '.join(WORKLOADS)})")
    if a.iters < 1:
        p.error("--iters must be at least 1")

    try:
        import torch
        import diffusers  # noqa: F401
    except (ImportError, OSError, ValueError) as e:
        # ValueError/OSError: a torch wheel installed without the libraries it links to.
        raise SystemExit(f"error: cannot import torch and diffusers in {sys.executable}: {e} (see bench/README.md)")

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    step = build(a.workload, dtype)
    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result = dict(
        workload=a.workload,
        dtype=a.dtype,
        threads=torch.get_num_threads(),
        iters=a.iters,
        median_s=statistics.median(times),
        min_s=min(times),
        # ru_maxrss is in kilobytes on Linux.
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    if a.json:
        print(json.dumps(result))
    else:
        print(
            f"{a.workload}  {a.dtype}  {result['threads']} threads  {result['median_s']:.4f} s/iter "
            f"(median of {a.iters}, min {result['min_s']:.4f})  peak RSS "
            f"{result['peak_rss_bytes'] / 2**20:.0f} MiB  (torch {torch.__version__})"
        )


if __name__ == "__main__":
    sys.exit(main())
