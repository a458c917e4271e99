"""Document quality score in [0, 1] and the threshold stage (InternLM2 "High-quality data").

InternLM2 scores with BERT classifiers (advertisement, fluency) trained on human labels. We ship a
transparent heuristic instead and keep the scorer pluggable (corpus.quality.scorer = "pkg.module:name"),
so a model-based scorer drops in with no pipeline change. The heuristic is a weighted mean of four signals,
each in [0, 1]:

  stopword   = min(1, r / target), r = stop-word tokens / word tokens      (keyword lists and salad: r ~ 0)
  word_len   = 1 if 3 <= L <= 10 else decays linearly to 0 at L = 2 and L = 15 (L = mean word length; Gopher)
  alpha      = words containing a letter / words                            (tables, numbers, symbol runs)
  sentence   = words inside well-formed sentences / words                   (capitalised, 3..100 words,
                                                                             ending in . ! ?; the last one
                                                                             may lack its full stop)
  score      = sum_i w_i * s_i / sum_i w_i
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from functools import lru_cache

from data.corpus.config import QualityConfig

STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her here
    hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
    off on once only or other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up very was we were what
    when where which while who whom why will with would you your yours yourself yourselves""".split()
)
_TOKEN = re.compile(r"[^\W\d_]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

Scorer = Callable[[list[str]], Sequence[float]]


def quality_signals(text: str, cfg: QualityConfig) -> dict[str, float]:
    words = text.split()
    if not words:
        return {"stopword": 0.0, "word_len": 0.0, "alpha": 0.0, "sentence": 0.0}
    tokens = _TOKEN.findall(text.lower())
    stop_ratio = sum(t in STOPWORDS for t in tokens) / max(len(tokens), 1)
    mean_len = sum(map(len, tokens)) / max(len(tokens), 1)
    if mean_len < 3:
        word_len = max(0.0, mean_len - 2.0)
    elif mean_len > 10:
        word_len = max(0.0, 1.0 - (mean_len - 10.0) / 5.0)
    else:
        word_len = 1.0
    sentences = [s for s in _SENTENCE_END.split(" ".join(words)) if s]
    good_words = 0
    for i, sentence in enumerate(sentences):
        n = len(sentence.split())
        ends_well = sentence.endswith((".", "!", "?")) or i == len(sentences) - 1 and len(sentences) > 1
        if 3 <= n <= 100 and (sentence[0].isupper() or sentence[0].isdigit()) and ends_well:
            good_words += n
    return {
        "stopword": min(1.0, stop_ratio / cfg.stopword_target),
        "word_len": word_len,
        "alpha": sum(1 for w in words if _TOKEN.search(w)) / len(words),
        "sentence": good_words / len(words),
    }


def heuristic_quality_score(text: str, cfg: QualityConfig) -> float:
    s = quality_signals(text, cfg)
    weights = {
        "stopword": cfg.stopword_weight, "word_len": cfg.word_length_weight, "alpha": cfg.alpha_weight,
        "sentence": cfg.sentence_weight,
    }
    return sum(weights[k] * s[k] for k in weights) / sum(weights.values())


def heuristic_quality_scores(texts: list[str], cfg: QualityConfig) -> list[float]:
    return [heuristic_quality_score(t, cfg) for t in texts]


@lru_cache(maxsize=4)
def _load_custom(spec: str) -> Scorer:
    module_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"corpus.quality.scorer {spec!r} cannot be loaded: {e}") from None
    # A class is a stateful scorer (e.g. a classifier): build it once per worker process and reuse it.
    return obj() if isinstance(obj, type) else obj


def load_scorer(cfg: QualityConfig) -> Scorer:
    if cfg.scorer == "heuristic":
        return lambda texts: heuristic_quality_scores(texts, cfg)
    return _load_custom(cfg.scorer)


def score_texts(texts: list[str], cfg: QualityConfig) -> list[float]:
    scores = [float(s) for s in load_scorer(cfg)(texts)]
    if len(scores) != len(texts):
        raise ValueError(f"quality scorer {cfg.scorer!r} returned {len(scores)} scores for {len(texts)} texts")
    bad = [s for s in scores if not 0.0 <= s <= 1.0]
    if bad:
        raise ValueError(f"quality scorer {cfg.scorer!r} returned scores outside [0, 1], e.g. {bad[0]}")
    return scores
