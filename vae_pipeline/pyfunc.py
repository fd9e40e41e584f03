"""The registered model as MLflow pyfunc: images in, latent means / anomaly scores out.

Logged as "models from code" (this file is the model's code, nothing is pickled), and its
weights are loaded with `torch.load(weights_only=True)`. `predict` takes a float32 array (N, C, H, W) of intensities in [0, 1] and returns, per
`params={"output": ...}`: "latent_mean" (default, N x latent_dim), "score" (negative ELBO per
image in nats, the anomaly score) or "reconstruction" (N x C*H*W).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import mlflow.models
import mlflow.pyfunc
import numpy as np
import torch


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

    # np.ndarray is a hint MLflow accepts without inferring a schema from it; the tensor
    # signature (N, C, H, W) and the `output` param are logged explicitly instead.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        from vae_pipeline.elbo import elbo_terms

        output = (params or {}).get("output", "latent_mean")
        x = torch.as_tensor(np.asarray(model_input))
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        with torch.no_grad():
            if output == "latent_mean":
                return self.model.encode(x)[0].numpy()
            if output == "score":
                torch.manual_seed(0)
                return (-elbo_terms(self.model, x)["elbo"]).numpy()
            if output == "reconstruction":
                return self.model.decode(self.model.encode(x)[0]).flatten(1).numpy()
        raise ValueError(
            f"params.output must be latent_mean, score or reconstruction, not {output!r}"
        )


mlflow.models.set_model(VAEPyfunc())
