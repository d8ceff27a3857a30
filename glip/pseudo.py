"""Names kept for the callers of the former pseudo-labelling module.

Labelling any corpus is `glip.label` (`python -m glip label`); judging pseudo-labels of the synthetic
world's web split against its hidden boxes (reporting only) is `glip.data.judge`.
"""
from glip.data.judge import by_word, judge_regions, pseudo_label_precision, sweep
from glip.label import ARTICLES, known_word_prompt

__all__ = ["ARTICLES", "by_word", "judge_regions", "known_word_prompt", "pseudo_label_precision", "sweep"]
