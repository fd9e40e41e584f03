"""`python -m vae_pipeline.cli`: the `vae-pipeline` command."""

import sys

from vae_pipeline.cli import entry

sys.exit(entry())
