"""Evaluation throughput: test images/s of the ELBO + IW evaluation at several K and chunk sizes.

    python bench/eval_throughput.py                      # demo model (1x32x32, latent 32)
    python bench/eval_throughput.py --k 1 1000 --chunk 16 128 --images 100

Side by side in one run: a plain fp32 matmul (this machine's GEMM rate); the decoder alone,
`model.decode_logits` (what training runs) against `model.inference_decoder()` (what evaluation
runs: first two layers fused, channels_last); then `evaluate.per_example_terms` on random uint8
images (throughput does not depend on content) for each (K, chunk). For each it reports
images/s, the decoder FLOP rate as a fraction of the GEMM rate, and the extrapolated time for
the 10,000 Fashion-MNIST test images.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch
from common import gemm_gflops
from torch.utils.flop_counter import FlopCounterMode

from vae_pipeline.config.sections import EvaluateConfig
from vae_pipeline.evaluate.estimator import per_example_terms
from vae_pipeline.model import ConvVAE


def decoder_flops_per_sample(decode, latent_dim: int) -> float:
    z = torch.randn(64, latent_dim)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        decode(z)
    return counter.get_total_flops() / 64


def samples_per_s(decoders: dict, z: torch.Tensor, rounds: int = 7) -> dict[str, float]:
    """Decoder samples/s, the decoders alternating round by round (best round of each), so a
    noisy neighbour slows both rather than one."""
    best = dict.fromkeys(decoders, 0.0)
    with torch.inference_mode():
        for decode in decoders.values():
            decode(z)  # warm-up
        for _ in range(rounds):
            for name, decode in decoders.items():
                start = time.perf_counter()
                decode(z)
                best[name] = max(best[name], len(z) / (time.perf_counter() - start))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=200, help="images per measurement (default 200)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 16, 1000], help="IW sample counts")
    p.add_argument("--chunk", type=int, nargs="+", default=[16, 128], help="iw_chunk values")
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=100, help="evaluate.batch_size")
    p.add_argument("--image-size", type=int, default=32)
    args = p.parse_args()

    torch.manual_seed(0)
    model = ConvVAE(1, args.image_size, args.latent_dim).eval()
    images = torch.randint(0, 256, (args.images, 1, args.image_size, args.image_size))
    images = images.to(torch.uint8)
    peak = gemm_gflops()
    flops = decoder_flops_per_sample(model.decode_logits, args.latent_dim)
    fast_flops = decoder_flops_per_sample(model.inference_decoder(), args.latent_dim)
    print(
        f"# {date.today()}  {platform.processor() or platform.machine()}  "
        f"{torch.get_num_threads()} threads  torch {torch.__version__}"
    )
    print(
        f"# fp32 GEMM {peak:.0f} GFLOP/s; decoder {flops / 1e6:.1f} MFLOP per sample, "
        f"inference decoder {fast_flops / 1e6:.1f}"
    )
    z = torch.randn(1600, args.latent_dim)
    rates = samples_per_s(
        {"decode_logits": model.decode_logits, "inference_decoder": model.inference_decoder()}, z
    )
    plain, fast = rates["decode_logits"], rates["inference_decoder"]
    print("| decoder (batch 1600) | samples/s | GFLOP/s | of GEMM rate |")
    print("|---|---|---|---|")
    for label, rate, f in (
        ("decode_logits", plain, flops),
        ("inference_decoder", fast, fast_flops),
    ):
        print(f"| {label} | {rate:.0f} | {rate * f / 1e9:.0f} | {rate * f / 1e9 / peak:.0%} |")
    print(f"# inference_decoder / decode_logits: {fast / plain:.2f}x\n")
    # The same evaluation code with the training decoder, side by side: the instance attribute
    # makes `inference_decoder()` hand back `decode_logits` itself.
    plain_model = ConvVAE(1, args.image_size, args.latent_dim).eval()
    plain_model.load_state_dict(model.state_dict())
    plain_model.inference_decoder = lambda: plain_model.decode_logits
    print(
        "| K | iw_chunk | images/s | with decode_logits | speed-up | decoder GFLOP/s "
        "| of GEMM rate | 10k test images |"
    )
    print("|---|---|---|---|---|---|---|---|")
    cpu = torch.device("cpu")
    for k in args.k:
        for chunk in args.chunk if k > 1 else [1]:
            ecfg = EvaluateConfig(iw_samples=k, iw_chunk=chunk, batch_size=args.batch_size)
            n = args.images if k < 100 else max(20, args.images // 10)
            rate = {}
            for name, m in (("fast", model), ("plain", plain_model)):
                per_example_terms(m, images[:20], ecfg, cpu)  # warm-up
                start = time.perf_counter()
                per_example_terms(m, images[:n], ecfg, cpu)
                rate[name] = n / (time.perf_counter() - start)
            # k IW samples + 1 ELBO sample decoded per image, by the inference decoder
            gflops = rate["fast"] * (k + 1) * fast_flops / 1e9
            print(
                f"| {k} | {chunk} | {rate['fast']:.1f} | {rate['plain']:.1f} "
                f"| {rate['fast'] / rate['plain']:.2f}x | {gflops:.0f} | {gflops / peak:.0%} "
                f"| {10_000 / rate['fast'] / 60:.1f} min |",
                flush=True,
            )


if __name__ == "__main__":
    main()
