"""Model registry: registration with lineage, the promotion gate, aliases, their history, rollback.

Aliases on the registered model (`registry.model_name`):
  champion           what consumers load (models:/conv-vae@champion)
  challenger         the latest candidate the gate did not promote
  previous-champion  the champion before the current one (what `rollback` returns to)

The rule is in `vae_pipeline.gate`. The evidence is per-example test metrics of candidate and
champion on the same evaluation (test data version, K, binarization, seed): each registered
version's run holds `reports/per_example_<metric>.npy`; a champion evaluated otherwise is
re-evaluated on the candidate's test split first.

Every alias move is appended to the registered model's tags (`history.000001`, ... as JSON):
who, when, why, and the metrics on both sides; `history()` reads them back. Moves are serialised
by a lock held in the registry itself (`vae_pipeline.promotion_lock`), so two flows finishing
together cannot both win or leave the aliases inconsistent, whether on SQLite or a shared server.

One module per job: `versions` (registration, tags, aliases), `evidence` (per-example values
for the gate), `history`, `promotion` (the gate under the lock, floors, rollback); lineage is
`vae_pipeline.lineage`. Every name is importable from here.
"""

from __future__ import annotations

import logging

from mlflow.tracking import MlflowClient

from vae_pipeline.promotion_lock import (  # noqa: F401 (re-exported: registry.promotion_lock)
    LOCK_SUFFIX,
    PromotionError,
    lock_entries,
    promotion_lock,
)
from vae_pipeline.registry.evidence import (  # noqa: F401 (re-exported)
    Evidence,
    per_example,
)
from vae_pipeline.registry.history import (  # noqa: F401 (re-exported)
    HISTORY_PREFIX,
    _now,
    _record,
    _side,
    history,
)
from vae_pipeline.registry.promotion import (  # noqa: F401 (re-exported)
    Decision,
    _apply,
    _likelihood,
    _with_floors,
    decision_dict,
    promote_if_better,
    rollback,
)
from vae_pipeline.registry.versions import (  # noqa: F401 (re-exported)
    CHALLENGER,
    CHAMPION,
    PER_EXAMPLE,
    PREVIOUS,
    USE_METRIC_PREFIXES,
    _actor,
    _get_registered_model,
    _is_number,
    alias_version,
    champion,
    current_eval_key,
    current_uses_key,
    eval_key,
    register,
    stored_uses,
    version_of_run,
    version_tags,
)
from vae_pipeline.tracking import client_for  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


def lineage(client: MlflowClient, name: str, version: str) -> dict:
    """A version's lineage tags, aliases and the commands that reproduce it
    (`vae_pipeline.lineage`)."""
    from vae_pipeline.lineage import reproduce

    mv = client.get_model_version(name, str(version))
    tags = dict(mv.tags or {})
    return {
        "name": name,
        "version": str(mv.version),
        "aliases": list(mv.aliases or []),
        "run_id": mv.run_id,
        "source": mv.source,
        "tags": tags,
        "reproduce": reproduce(client, name, str(mv.version), tags, mv.run_id),
    }
