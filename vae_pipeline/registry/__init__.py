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
The names below are the registry's API for scripts; the package's own code imports each name
from its module.
"""

from vae_pipeline.registry.lock import PromotionError
from vae_pipeline.registry.promotion import Decision, promote_if_better, rollback
from vae_pipeline.registry.versions import champion, register

__all__ = [
    "Decision",
    "PromotionError",
    "champion",
    "promote_if_better",
    "register",
    "rollback",
]
