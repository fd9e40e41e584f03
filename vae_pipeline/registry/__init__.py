"""Model registry: registration with lineage, the promotion gate, aliases, their history, rollback.

Aliases on the registered model (`registry.model_name`):
  champion           what consumers load (models:/conv-vae@champion)
  challenger         the latest candidate the gate did not promote
  previous-champion  the champion before the current one (what `rollback` returns to)

The rule is in `registry.gate`. The evidence is per-example test metrics of candidate and
champion on the same evaluation (test data version, K, binarization, seed): each registered
version's run holds `reports/per_example_<metric>.npy`; a champion evaluated otherwise is
re-evaluated on the candidate's test split first.

Every alias move is appended to the registered model's tags (`history.000001`, ... as JSON):
who, when, why, and the metrics on both sides; `history.history()` reads them back. Moves are serialised
by a lock held in the registry itself (`registry.lock`), so two flows finishing
together cannot both win or leave the aliases inconsistent, whether on SQLite or a shared server.

One module per job: `versions` (registration, tags, aliases), `gate` (the promotion rule),
`lock` (the lock for alias moves), `evidence` (per-example values for the gate), `history`,
`promotion` (the gate under the lock, floors, rollback); lineage is `vae_pipeline.lineage`.
The names below are the registry's API for scripts, imported on first use (PEP 562, as in
`vae_pipeline.data`); the package's own code imports each name from its module.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Decision": "vae_pipeline.registry.promotion",
    "PromotionError": "vae_pipeline.registry.lock",
    "champion": "vae_pipeline.registry.versions",
    "promote_if_better": "vae_pipeline.registry.promotion",
    "register": "vae_pipeline.registry.versions",
    "rollback": "vae_pipeline.registry.promotion",
}

__all__ = ["Decision", "PromotionError", "champion", "promote_if_better", "register", "rollback"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
