"""The seed's convolutional VAE, with every layer shape derived from the image size.

At `ConvVAE(in_channels=3, image_size=250, latent_dim=128)` this is the seed's model exactly
(encoder flatten 512*16*16 = 131072, 53,564,419 parameters, same module names so a seed
state_dict loads). Two seed bugs are not carried over: its `Reshape((-1, 512, 16, 16))` passed a
nested tuple to `view`, and its loss used `F` without importing it. The decoder ends in logits;
`decode` applies the sigmoid, and the loss uses BCE-with-logits, the stable form of sigmoid + BCE.

`likelihood="gaussian"` makes p(x|z) = N(x; sigmoid(logits), sigma^2 I) with one learned
log sigma (`log_sigma`, the "calibrated decoder" of Rybkin et al. 2021); the Bernoulli model has
no extra parameter, so the seed's state_dict still loads. `likelihood="discretized_logistic"`
is a normalised distribution over the 256 levels of 8-bit pixels (Salimans et al. 2017,
PixelCNN++, one logistic per pixel): its decoder's last layer has 2C outputs, a mean and a log
scale per pixel, and its nats (and bits/dim) are comparable with published tables.

`content_box=(top, left, height, width)` marks the image's real pixels when a source was padded
to `image_size` (Fashion-MNIST's 28x28 in 32x32): the likelihood sums over that box only, so
the padding neither costs nor earns nats, and `pixel_count()` (the D of bits/dim) counts it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CHANNELS = (64, 128, 256, 512)
LIKELIHOODS = ("bernoulli", "gaussian", "discretized_logistic")
MIN_LOG_SCALE = -7.0  # floor of the discretized logistic's log scale (as in PixelCNN++)
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
        content_box: tuple[int, int, int, int] | list[int] | None = None,
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
        self.content_box = _check_box(content_box, image_size)
        self.register_buffer(
            "pixel_mask", _box_mask(self.content_box, image_size), persistent=False
        )
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
        # the discretized logistic needs a mean and a log scale per pixel: 2C outputs
        out_channels = in_channels * (2 if likelihood == "discretized_logistic" else 1)
        rev_widths = (*widths[::-1][:-1], out_channels)
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
        """The decoder's output: logits, or a mean and a log scale per pixel. Its last layer
        (the likelihood head) runs in fp32 inside an autocast region too: `likelihood_head`."""
        *body, head = self.decoder
        h = self.decoder_input(z)
        for layer in body:
            h = layer(h)
        return likelihood_head(head, h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of p(x|z): pixel intensities in [0, 1]."""
        return self.output_mean(self.decode_logits(z))

    def output_mean(self, logits: torch.Tensor) -> torch.Tensor:
        """The decoder output (logits, or mean and log scale) as intensities in [0, 1]; pixels
        outside `content_box` are 0, the padding's value."""
        if self.likelihood == "discretized_logistic":
            mean = (logits[:, : self.in_channels].clamp(-1.0, 1.0) + 1.0) / 2.0
        else:
            mean = torch.sigmoid(logits)
        return mean if self.pixel_mask is None else mean * self.pixel_mask

    def forward_logits(
        self, x: torch.Tensor, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits of p(x|z), mu, logvar): what the loss uses."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, eps)
        return self.decode_logits(z), mu, logvar

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, mu, logvar = self.forward_logits(x)
        return self.output_mean(logits), mu, logvar

    def log_likelihood(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z) per example (nats, summed over the real pixels) from the decoder's
        output; x in [0, 1] (for the discretized logistic: k/255, k = 0..255)."""
        mask = self.pixel_mask
        if self.likelihood == "gaussian":
            return gaussian_log_likelihood(torch.sigmoid(logits), self.log_sigma, x, mask)
        if self.likelihood == "discretized_logistic":
            c = self.in_channels
            return discretized_logistic_log_likelihood(logits[:, :c], logits[:, c:], x, mask)
        return bernoulli_log_likelihood(logits, x, mask)

    def pixel_count(self) -> int:
        """D of bits/dim: the real pixels (times channels) the likelihood sums over."""
        if self.content_box is None:
            return self.in_channels * self.image_size**2
        return self.in_channels * self.content_box[2] * self.content_box[3]

    def hparams(self) -> dict:
        """Constructor arguments, stored beside the weights so a checkpoint rebuilds itself."""
        out: dict = {
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "latent_dim": self.latent_dim,
            "likelihood": self.likelihood,
        }
        if self.content_box is not None:
            out["content_box"] = list(self.content_box)
        return out

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


def likelihood_head(head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """`head(h)` with autocast off and `h` in the head's own dtype (fp32 under autocast).

    Under bf16 autocast the head's output would be rounded to 8 significant bits: near 1 a
    discretized logistic's mean has steps of 2^-8, half a bin of 2/255, and a sharp decoder
    (small log scale) pays for the rounding in nats, tens per image at 1x32x32; a sharp
    Gaussian's mean alike (tests/test_likelihoods.py measures it). The layers below keep autocast's speed. Outside autocast this is
    `head(h)` itself, the same numbers bit for bit (`h.to` of its own dtype returns `h`)."""
    with torch.autocast(h.device.type, enabled=False):
        return head(h.to(head.weight.dtype))


def _side_after(first: nn.ConvTranspose2d, unflatten: nn.Unflatten) -> int:
    side = unflatten.unflattened_size[-1]
    out = (side - 1) * 2 - 2 + 3 + first.output_padding[0]
    return out * out


def _check_box(box, image_size: int) -> tuple[int, int, int, int] | None:
    if box is None:
        return None
    top, left, height, width = (int(v) for v in box)
    if min(top, left) < 0 or min(height, width) < 1 or max(top + height, left + width) > image_size:
        raise ValueError(f"content_box {list(box)} does not fit a {image_size}x{image_size} image")
    if (top, left, height, width) == (0, 0, image_size, image_size):
        return None  # the whole image: no mask
    return top, left, height, width


def _box_mask(box, image_size: int) -> torch.Tensor | None:
    if box is None:
        return None
    top, left, height, width = box
    mask = torch.zeros(1, 1, image_size, image_size)
    mask[..., top : top + height, left : left + width] = 1.0
    return mask


def _sum_pixels(per_pixel: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-example sum over pixels (and channels), over the mask's pixels only when given."""
    if mask is not None:
        per_pixel = per_pixel * mask
    return per_pixel.flatten(1).sum(dim=1)


def bernoulli_log_likelihood(
    logits: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """log p(x | z) per example for Bernoulli pixels with these logits; x in [0, 1].

    BCE-with-logits is the numerically stable form of sigmoid followed by BCE. A normalised
    distribution only for binary x (binarized data); on intensities it is the seed's loss.
    """
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    return -_sum_pixels(bce, mask)


def gaussian_log_likelihood(
    mean: torch.Tensor, log_sigma: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """log N(x; mean, sigma^2 I) per example, with the normalising constant
    -D (log sigma + log(2 pi) / 2); log sigma is floored at MIN_LOG_SIGMA."""
    log_sigma = torch.clamp(log_sigma, min=MIN_LOG_SIGMA)
    sq = ((x - mean) * torch.exp(-log_sigma)).pow(2)
    per_pixel = -0.5 * sq - log_sigma - 0.5 * math.log(2 * math.pi)
    return _sum_pixels(per_pixel, mask)


def discretized_logistic_log_likelihood(
    mean: torch.Tensor,
    log_scale: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    levels: int = 256,
) -> torch.Tensor:
    """log P(x | z) per example for 8-bit pixels, each a logistic(mean, scale) on [-1, 1]
    integrated over its bin of width 2/255; the bins of 0 and 255 reach out to -inf and +inf,
    so the 256 probabilities of a pixel sum to 1 (Salimans et al. 2017, PixelCNN++, eq. 2,
    with one component). x in [0, 1] holds k/255; its level k is recovered by rounding.

    Computed in log space without the float32 shortcuts of PixelCNN++'s code: log sigmoid for
    the edge bins, and for the others log(sigmoid(b) - sigmoid(a)) written around the tail the
    bin lies in (left of the mean: log sigmoid(b) + log(1 - sigmoid(a)/sigmoid(b)); right of
    it, the same for 1 - sigmoid), so far-tail bins keep their digits."""
    log_scale = torch.clamp(log_scale, min=MIN_LOG_SCALE)
    k = torch.round(x * (levels - 1))
    centred = 2.0 * k / (levels - 1) - 1.0 - mean
    inv_scale = torch.exp(-log_scale)
    half_bin = 1.0 / (levels - 1)
    plus = inv_scale * (centred + half_bin)
    minus = inv_scale * (centred - half_bin)
    # log(1 - e^d) for d < 0; d is kept below 0 so neither branch of the `where` is -inf
    # (an unselected -inf would still turn the gradient into NaN)
    tiny = torch.finfo(plus.dtype).tiny

    def log1mexp(d: torch.Tensor) -> torch.Tensor:
        return torch.log(-torch.expm1(torch.clamp(d, max=-tiny)))

    log_sig_plus, log_sig_minus = F.logsigmoid(plus), F.logsigmoid(minus)
    log_sig_neg_plus, log_sig_neg_minus = F.logsigmoid(-plus), F.logsigmoid(-minus)
    left = log_sig_plus + log1mexp(log_sig_minus - log_sig_plus)
    right = log_sig_neg_minus + log1mexp(log_sig_neg_plus - log_sig_neg_minus)
    log_delta = torch.where(centred > 0, right, left)
    per_pixel = torch.where(
        k <= 0, log_sig_plus, torch.where(k >= levels - 1, log_sig_neg_minus, log_delta)
    )
    return _sum_pixels(per_pixel, mask)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
