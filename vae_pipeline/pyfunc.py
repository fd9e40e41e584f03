"""The registered model as MLflow pyfunc: images in, latent means / anomaly scores out.

Logged as "models from code" (this file is the model's code, nothing is pickled), and its
weights are loaded with `torch.load(weights_only=True)`. `predict` takes a float32 array
(N, C, H, W) of intensities in [0, 1] (or uint8 0..255) and returns, per
`params={"output": ...}`:
  "latent_mean" (default, N x latent_dim) and "latent_logvar" (N x latent_dim): q(z|x);
  "score": negative ELBO per image in nats, the anomaly score;
  "iw_score": negative importance-weighted bound with `params={"k": K}` samples (default 64),
    a tighter anomaly score;
  "is_anomaly": 1 where the image's score is above the threshold calibrated at evaluation
    (anomaly.json: the score, its K and the threshold, stored with the model), else 0;
  "reconstruction" (N x C*H*W).
Scores are seeded, so the same images always get the same score.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import mlflow.models
import mlflow.pyfunc
import numpy as np
import torch

DEFAULT_IW_K = 64


def pip_requirements() -> list[str]:
    reqs = []
    for name in ("torch", "torchvision", "numpy", "mlflow"):
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


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
        # Seeded in a forked RNG: same images, same scores; the caller's RNG is left alone.
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
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
                a = self.anomaly
                if a["score"] == "iw_nll":
                    k = int(a["k"])
                    scores = -iw_log_likelihood(self.model, x, k, min(k, 64))
                else:
                    scores = -elbo_terms(self.model, x)["elbo"]
                return (scores > float(a["threshold"])).to(torch.int64).numpy()
            if output == "score":
                return (-elbo_terms(self.model, x)["elbo"]).numpy()
            if output == "iw_score":
                k = int((params or {}).get("k", DEFAULT_IW_K))
                if k < 1:
                    raise ValueError(f"params.k must be >= 1, not {k}")
                return (-iw_log_likelihood(self.model, x, k, min(k, 64))).numpy()
            if output == "reconstruction":
                return self.model.decode(self.model.encode(x)[0]).flatten(1).numpy()
        raise ValueError(
            "params.output must be latent_mean, latent_logvar, score, iw_score, is_anomaly or "
            f"reconstruction, not {output!r}"
        )


mlflow.models.set_model(VAEPyfunc())
