"""Built-in reward functions, named in config as ``module:function``.

A reward function takes the user prompts and the responses (two lists of equal length) and
returns one float per response; it must be deterministic. It may raise, or return NaN/inf, for
rows it cannot score: the score stage reports those rows and fails (or drops them when
``score.scorer.drop_invalid`` is set).
"""

from __future__ import annotations

import functools
from typing import Any


@functools.lru_cache(maxsize=1)
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_sentiment(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound sentiment of each response, in [-1, 1] (the prompt is ignored)."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(r)["compound"]) for r in responses]
