"""The seed's convolutional VAE, with every layer shape derived from the image size.

At `ConvVAE(in_channels=3, image_size=250, latent_dim=128)` this is the seed's model exactly
(encoder flatten 512*16*16 = 131072, 53,564,419 parameters, same module names so a seed
state_dict loads). Two seed bugs are not carried over: its `Reshape((-1, 512, 16, 16))` passed a
nested tuple to `view`, and its loss used `F` without importing it. The decoder ends in logits;
`decode` applies the sigmoid, and the loss uses BCE-with-logits, the stable form of sigmoid + BCE.

`likelihood="gaussian"` makes p(x|z) = N(x; sigmoid(logits), sigma^2 I) with one learned
log sigma (`log_sigma`, the "calibrated decoder" of Rybkin et al. 2021); the Bernoulli model has
no extra parameter, so the seed's state_dict still loads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CHANNELS = (64, 128, 256, 512)
LIKELIHOODS = ("bernoulli", "gaussian")
MIN_LOG_SIGMA = -6.0  # floor of the Gaussian decoder's log sigma: keeps the density finite
# The fused first decoder layer is a (latent_dim x C*H*W) matrix; above this many entries the
# inference decoder keeps the two layers apart.
FUSE_MAX_ENTRIES = 64 * 2**20


def _conv_out(size: int) -> int:
    # Conv2d(kernel=3, stride=2, padding=1): floor((n + 2 - 3) / 2) + 1
    return (size - 1) // 2 + 1


def encoder_sizes(image_size: int) -> list[int]:
    """Spatial side after each encoder conv, input first: 250 -> [250, 125, 63, 32, 16]."""
    sizes = [image_size]
    for _ in CHANNELS:
        sizes.append(_conv_out(sizes[-1]))
    return sizes


class ConvVAE(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 250,
        latent_dim: int = 128,
        likelihood: str = "bernoulli",
    ):
        super().__init__()
        if image_size < 2 ** len(CHANNELS):
            raise ValueError(f"image_size must be at least {2 ** len(CHANNELS)}, got {image_size}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        self.likelihood = likelihood
        self.in_channels = in_channels
        self.image_size = image_size
        self.latent_dim = latent_dim
        sizes = encoder_sizes(image_size)
        side = sizes[-1]
        self.flat_dim = CHANNELS[-1] * side * side

        widths = (in_channels, *CHANNELS)
        enc: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            enc += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), nn.ReLU(True)]
        self.encoder = nn.Sequential(*enc, nn.Flatten())

        self.fc_mu = nn.Linear(self.flat_dim, latent_dim)
        self.fc_logvar = nn.Linear(self.flat_dim, latent_dim)
        self.decoder_input = nn.Linear(latent_dim, self.flat_dim)

        # ConvTranspose2d(kernel=3, stride=2, padding=1) maps n -> 2n - 1 + output_padding;
        # output_padding (0 or 1) is chosen so each layer lands on the encoder's size in reverse.
        dec: list[nn.Module] = [nn.Unflatten(1, (CHANNELS[-1], side, side))]
        rev_widths = widths[::-1]
        rev_sizes = sizes[::-1]
        for i, (c_in, c_out) in enumerate(zip(rev_widths[:-1], rev_widths[1:], strict=True)):
            output_padding = rev_sizes[i + 1] - (2 * rev_sizes[i] - 1)
            dec.append(
                nn.ConvTranspose2d(
                    c_in, c_out, kernel_size=3, stride=2, padding=1, output_padding=output_padding
                )
            )
            if i < len(CHANNELS) - 1:
                dec.append(nn.ReLU(True))
        self.decoder = nn.Sequential(*dec)
        if likelihood == "gaussian":
            self.log_sigma = nn.Parameter(torch.zeros(()))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def reparameterize(
        self, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I); pass `eps` to make the draw reproducible."""
        std = torch.exp(0.5 * logvar)
        if eps is None:
            eps = torch.randn_like(std)
        return mu + eps * std

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.decoder_input(z))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of p(x|z): pixel intensities in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z))

    def forward_logits(
        self, x: torch.Tensor, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits of p(x|z), mu, logvar): what the loss uses."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, eps)
        return self.decode_logits(z), mu, logvar

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, mu, logvar = self.forward_logits(x)
        return torch.sigmoid(logits), mu, logvar

    def log_likelihood(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z) per example (nats, summed over pixels) from the decoder's logits."""
        if self.likelihood == "gaussian":
            return gaussian_log_likelihood(torch.sigmoid(logits), self.log_sigma, x)
        return bernoulli_log_likelihood(logits, x)

    def hparams(self) -> dict[str, int | str]:
        """Constructor arguments, stored beside the weights so a checkpoint rebuilds itself."""
        return {
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "latent_dim": self.latent_dim,
            "likelihood": self.likelihood,
        }

    @torch.no_grad()
    def inference_decoder(self) -> InferenceDecoder:
        """A frozen copy of the decoder for evaluation (same function, about 2x the throughput
        on CPU); rebuild it after the weights change."""
        return InferenceDecoder(self)


class InferenceDecoder(nn.Module):
    """`decode_logits` rewritten for throughput, used where the decoder runs K times per image.

    The seed's decoder applies `decoder_input` (Linear) and the first ConvTranspose2d with no
    nonlinearity between them, so the pair is one affine map: z @ M + c with M the transposed
    convolution of each row of the Linear weight and c that of its bias. That removes about a
    third of the decoder's FLOPs at 1x32x32 (exact algebra; float rounding differs by ~1e-6).
    The remaining layers run in channels_last, which oneDNN's transposed convolutions prefer.
    """

    def __init__(self, vae: ConvVAE):
        super().__init__()
        layers = list(vae.decoder.children())  # [Unflatten, ConvT, ReLU, ConvT, ..., ConvT]
        unflatten, first, rest = layers[0], layers[1], layers[2:]
        lin = vae.decoder_input
        entries = vae.latent_dim * first.out_channels * _side_after(first, unflatten)
        device = lin.weight.device
        self.fused = entries <= FUSE_MAX_ENTRIES
        if self.fused:
            basis = unflatten(lin.weight.t().contiguous())  # (latent, C, s, s)
            bias_img = unflatten(lin.bias.unsqueeze(0))
            no_bias = F.conv_transpose2d(
                basis,
                first.weight,
                None,
                first.stride,
                first.padding,
                first.output_padding,
            )
            self.out_shape = tuple(no_bias.shape[1:])
            self.register_buffer("matrix", no_bias.flatten(1).contiguous())
            self.register_buffer("offset", first(bias_img).flatten(1).to(device))
            self.head = None
        else:
            self.head = nn.Sequential(lin, unflatten, first)
        self.rest = nn.Sequential(*rest).to(memory_format=torch.channels_last)
        self.eval().requires_grad_(False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            h = torch.addmm(self.offset, z, self.matrix).view(-1, *self.out_shape)
        else:
            h = self.head(z)
        return self.rest(h.contiguous(memory_format=torch.channels_last)).contiguous()


def _side_after(first: nn.ConvTranspose2d, unflatten: nn.Unflatten) -> int:
    side = unflatten.unflattened_size[-1]
    out = (side - 1) * 2 - 2 + 3 + first.output_padding[0]
    return out * out


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x | z) per example for Bernoulli pixels with these logits; x in [0, 1].

    BCE-with-logits is the numerically stable form of sigmoid followed by BCE.
    """
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    return -bce.flatten(1).sum(dim=1)


def gaussian_log_likelihood(
    mean: torch.Tensor, log_sigma: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """log N(x; mean, sigma^2 I) per example, with the normalising constant
    -D (log sigma + log(2 pi) / 2); log sigma is floored at MIN_LOG_SIGMA."""
    log_sigma = torch.clamp(log_sigma, min=MIN_LOG_SIGMA)
    sq = ((x - mean) * torch.exp(-log_sigma)).pow(2)
    per_pixel = -0.5 * sq - log_sigma - 0.5 * math.log(2 * math.pi)
    return per_pixel.flatten(1).sum(dim=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
