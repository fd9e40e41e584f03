"""The registered model as MLflow pyfunc: images in, latent means / anomaly scores out.

Logged as "models from code" (this file is the model's code, nothing is pickled), and its
weights are loaded with `torch.load(weights_only=True)`. `predict` takes a float32 array
(N, C, H, W) of intensities in [0, 1] (MLflow's signature check refuses other dtypes: pass
uint8 images as `images.astype(np.float32) / 255`) and returns, per `params={"output": ...}`
(each one's dtype and shape are in `OUTPUTS`, and in the logged model's metadata):
  "latent_mean" (default, N x latent_dim) and "latent_logvar" (N x latent_dim): q(z|x);
  "score": negative ELBO per image in nats, the anomaly score;
  "iw_score": negative importance-weighted bound with `params={"k": K}` samples (default 64),
    a tighter anomaly score;
  "is_anomaly": 1 where the image's anomaly score (anomaly.json's: typicality by default,
    `vae_pipeline.evaluate.anomaly`) is above the threshold calibrated at evaluation
    (anomaly.json: the score, its K, the threshold and typicality's reference), else 0;
  "reconstruction" (N x C*H*W).
Each image's posterior draws come from its own RNG stream, keyed by its content (the sha256
of its float32 pixels): the same image gets the same score alone or anywhere in any batch.
"""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, version

import mlflow.models
import mlflow.pyfunc
import numpy as np
import torch

DEFAULT_IW_K = 64
# What each `output` returns: the model's output schema, per output.
OUTPUTS = {
    "latent_mean": {"dtype": "float32", "shape": ["N", "latent_dim"]},
    "latent_logvar": {"dtype": "float32", "shape": ["N", "latent_dim"]},
    "score": {"dtype": "float32", "shape": ["N"], "unit": "nats"},
    "iw_score": {"dtype": "float32", "shape": ["N"], "unit": "nats"},
    "is_anomaly": {"dtype": "int64", "shape": ["N"]},
    "reconstruction": {"dtype": "float32", "shape": ["N", "C*H*W"]},
}


def pip_requirements() -> list[str]:
    reqs = []
    # scipy and pillow: the anomaly scores' complexity (`vae_pipeline.evaluate.anomaly`)
    for name in ("torch", "torchvision", "numpy", "mlflow", "scipy", "pillow"):
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def content_generators(x: torch.Tensor) -> list[torch.Generator]:
    """One RNG stream per image of `x` (float32), seeded by a hash of its pixels."""
    rows = x.detach().cpu().contiguous().float().flatten(1).numpy()
    return [
        torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(r.tobytes()).digest()[:8]) >> 1)
        for r in rows
    ]


def content_noise(x: torch.Tensor, latent_dim: int):
    """(eps for one posterior sample per image, noise(n) for the IW bound's next n samples,
    (n, N, latent)), both drawn from each image's content-keyed stream."""
    gens = content_generators(x)

    def draw(shape: tuple[int, ...], dim: int) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in gens], dim=dim)

    return draw((latent_dim,), 0), lambda n: draw((n, latent_dim), 1)


class VAEPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from vae_pipeline.train.checkpoint import load_model

        self.model, self.meta = load_model(context.artifacts["weights"])
        self.anomaly = None
        if "anomaly" in context.artifacts:  # models registered before it existed have none
            import json
            from pathlib import Path

            self.anomaly = json.loads(Path(context.artifacts["anomaly"]).read_text())

    # np.ndarray is a hint MLflow accepts without inferring a schema from it; the tensor
    # signature (N, C, H, W) and the `output` param are logged explicitly instead.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        from vae_pipeline.elbo import elbo_terms, iw_log_likelihood

        output = (params or {}).get("output", "latent_mean")
        x = torch.as_tensor(np.asarray(model_input))
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        d = self.model.latent_dim

        def elbo_score() -> torch.Tensor:
            eps, _ = content_noise(x, d)
            return -elbo_terms(self.model, x, eps)["elbo"]

        def iw_score(k: int) -> torch.Tensor:
            _, noise = content_noise(x, d)
            return -iw_log_likelihood(self.model, x, k, min(k, 64), noise=noise)

        with torch.no_grad():
            if output == "latent_mean":
                return self.model.encode(x)[0].numpy()
            if output == "latent_logvar":
                return self.model.encode(x)[1].numpy()
            if output == "is_anomaly":
                if self.anomaly is None:
                    raise ValueError(
                        "this model version stores no anomaly threshold (registered before "
                        "vae-pipeline calibrated one): use output=score and a threshold of yours"
                    )
                return self._flag(x, iw_score, elbo_score)
            if output == "score":
                return elbo_score().numpy()
            if output == "iw_score":
                k = int((params or {}).get("k", DEFAULT_IW_K))
                if k < 1:
                    raise ValueError(f"params.k must be >= 1, not {k}")
                return iw_score(k).numpy()
            if output == "reconstruction":
                return self.model.decode(self.model.encode(x)[0]).flatten(1).numpy()
        raise ValueError(
            "params.output must be latent_mean, latent_logvar, score, iw_score, is_anomaly or "
            f"reconstruction, not {output!r}"
        )

    def _flag(self, x: torch.Tensor, iw_score, elbo_score) -> np.ndarray:
        """1 where anomaly.json's score of the image is above its threshold."""
        from vae_pipeline.evaluate.anomaly import anomaly_scores, complexity

        a, model = self.anomaly, self.model
        if a["score"] == "neg_elbo":
            terms = {"elbo": -elbo_score().double().numpy()}
        else:
            terms = {"iw_log_px": -iw_score(int(a["k"])).double().numpy()}
            if a["score"] in ("complexity", "typicality"):
                length, floor = complexity(x, model.likelihood, model.content_box)
                terms.update(complexity=length, floor=floor)
        scores = anomaly_scores(terms, a["score"], a.get("reference"))
        return (scores > float(a["threshold"])).astype(np.int64)


mlflow.models.set_model(VAEPyfunc())
