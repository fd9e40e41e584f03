"""The gate's rule, as a pure function (the end-to-end tests drive it through MLflow)."""

import math

import pytest

from vae_pipeline.registry import decide


def test_first_model_is_promoted():
    assert decide(300.0, None, 0.0) == (True, "no champion yet")


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "promoted"),
    [
        (299.0, 300.0, 0.0, True),  # lower iw_nll is better
        (300.0, 300.0, 0.0, False),  # a tie is not an improvement
        (301.0, 300.0, 0.0, False),
        (299.5, 300.0, 1.0, False),  # better, but not by the required margin
        (298.5, 300.0, 1.0, True),
    ],
)
def test_candidate_must_beat_champion_by_the_margin(candidate, champion, margin, promoted):
    assert decide(candidate, champion, margin)[0] is promoted


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_candidate_is_never_promoted(bad):
    promoted, reason = decide(bad, None, 0.0)
    assert not promoted and "not finite" in reason
