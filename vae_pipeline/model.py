"""The seed's convolutional VAE, with every layer shape derived from the image size.

At `ConvVAE(in_channels=3, image_size=250, latent_dim=128)` this is the seed's model exactly
(encoder flatten 512*16*16 = 131072, 53,564,419 parameters, same module names so a seed
state_dict loads). Two seed bugs are not carried over: its `Reshape((-1, 512, 16, 16))` passed a
nested tuple to `view`, and its loss used `F` without importing it. The decoder ends in logits;
`decode` applies the sigmoid, and the loss uses BCE-with-logits, the stable form of sigmoid + BCE.
"""

from __future__ import annotations

import torch
from torch import nn

CHANNELS = (64, 128, 256, 512)


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
    def __init__(self, in_channels: int = 3, image_size: int = 250, latent_dim: int = 128):
        super().__init__()
        if image_size < 2 ** len(CHANNELS):
            raise ValueError(f"image_size must be at least {2 ** len(CHANNELS)}, got {image_size}")
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

    def hparams(self) -> dict[str, int]:
        """Constructor arguments, stored beside the weights so a checkpoint rebuilds itself."""
        return {
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "latent_dim": self.latent_dim,
        }


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
