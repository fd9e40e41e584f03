"""ConvVAE against an independent copy of the seed's model (its two bugs fixed)."""

import pytest
import torch
import torch.nn as nn

from vae_pipeline.model import ConvVAE, count_parameters


class SeedReshape(nn.Module):
    def __init__(self, *shape):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x.view(*self.shape)  # the seed passed a nested tuple here


class SeedConvVAE(nn.Module):
    """The seed notebook's ConvVAE, verbatim apart from the Reshape fix."""

    def __init__(self, latent_dim=128):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2, 1),
            nn.ReLU(True),
            nn.Conv2d(64, 128, 3, 2, 1),
            nn.ReLU(True),
            nn.Conv2d(128, 256, 3, 2, 1),
            nn.ReLU(True),
            nn.Conv2d(256, 512, 3, 2, 1),
            nn.ReLU(True),
            nn.Flatten(),
        )
        self.fc_mu = nn.Linear(512 * 16 * 16, latent_dim)
        self.fc_logvar = nn.Linear(512 * 16 * 16, latent_dim)
        self.decoder_input = nn.Linear(latent_dim, 512 * 16 * 16)
        self.decoder = nn.Sequential(
            SeedReshape(-1, 512, 16, 16),
            nn.ConvTranspose2d(512, 256, 3, 2, 1, output_padding=1), nn.ReLU(True),
            nn.ConvTranspose2d(256, 128, 3, 2, 1, output_padding=0), nn.ReLU(True),
            nn.ConvTranspose2d(128, 64, 3, 2, 1, output_padding=0), nn.ReLU(True),
            nn.ConvTranspose2d(64, 3, 3, 2, 1, output_padding=1), nn.Sigmoid(),
        )  # fmt: skip

    def forward(self, x, eps):
        h = self.encoder(x)
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.decoder(self.decoder_input(z)), mu, logvar


def test_seed_parity_at_3x250x250():
    torch.manual_seed(0)
    ours = ConvVAE(in_channels=3, image_size=250, latent_dim=128)
    seed = SeedConvVAE(128)
    assert ours.flat_dim == 131072
    assert count_parameters(ours) == count_parameters(seed) == 53_564_419
    seed.load_state_dict(ours.state_dict(), strict=True)  # same names, same shapes
    x = torch.rand(2, 3, 250, 250)
    eps = torch.randn(2, 128)
    with torch.no_grad():
        ref, ref_mu, ref_logvar = seed(x, eps)
        mu, logvar = ours.encode(x)
        out = ours.decode(ours.reparameterize(mu, logvar, eps))
    assert out.shape == (2, 3, 250, 250)
    torch.testing.assert_close(mu, ref_mu)
    torch.testing.assert_close(logvar, ref_logvar)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize(("channels", "size"), [(1, 32), (1, 28), (3, 64), (1, 37), (3, 16)])
def test_shapes_are_derived_for_other_sizes(channels, size):
    model = ConvVAE(channels, size, latent_dim=5)
    x = torch.rand(3, channels, size, size)
    x_hat, mu, logvar = model(x)
    assert x_hat.shape == x.shape
    assert mu.shape == logvar.shape == (3, 5)
    assert x_hat.min() >= 0.0 and x_hat.max() <= 1.0


def test_decode_is_sigmoid_of_logits():
    model = ConvVAE(1, 32, 4)
    z = torch.randn(2, 4)
    torch.testing.assert_close(model.decode(z), torch.sigmoid(model.decode_logits(z)))


def test_too_small_image_is_refused():
    with pytest.raises(ValueError, match="image_size"):
        ConvVAE(1, 8, 4)


@pytest.mark.parametrize(
    ("channels", "size", "latent"), [(1, 32, 32), (1, 28, 8), (3, 37, 5), (3, 250, 4)]
)
@pytest.mark.parametrize("fuse", [True, False])
def test_inference_decoder_computes_decode_logits(channels, size, latent, fuse, monkeypatch):
    import vae_pipeline.model as model_module

    if not fuse:
        monkeypatch.setattr(model_module, "FUSE_MAX_ENTRIES", 0)
    torch.manual_seed(0)
    model = ConvVAE(channels, size, latent).eval()
    decoder = model.inference_decoder()
    assert decoder.fused is fuse
    z = torch.randn(6, latent)
    with torch.no_grad():
        expected = model.decode_logits(z)
        got = decoder(z)
    assert got.shape == expected.shape == (6, channels, size, size)
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gaussian_likelihood_adds_only_log_sigma():
    bern = ConvVAE(1, 32, 8)
    gauss = ConvVAE(1, 32, 8, likelihood="gaussian")
    assert count_parameters(gauss) == count_parameters(bern) + 1
    assert gauss.log_sigma.item() == 0.0
    assert gauss.hparams()["likelihood"] == "gaussian"
    assert ConvVAE(**gauss.hparams()).likelihood == "gaussian"  # a checkpoint rebuilds it
    with pytest.raises(ValueError, match="likelihood"):
        ConvVAE(1, 32, 8, likelihood="poisson")
