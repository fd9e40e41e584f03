"""Prefect flows over `vae_pipeline.pipeline`: `retrain`, `monitor`, and their deployments.

Prefect reads its settings when it is imported, so the quiet offline defaults (no analytics,
no UI, PREFECT_HOME in the working directory, a startup timeout that 2 cores can meet) are set
here, once, before any flow module imports it. A value the user set wins.
"""

from vae_pipeline.config.environment import apply_quiet_offline_defaults

apply_quiet_offline_defaults()

__all__: list[str] = []  # the flows are in their modules: flows.retrain, flows.monitor
