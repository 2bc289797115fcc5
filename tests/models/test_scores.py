import pytest

from exitserve.models.scores import all_scores, score


def test_metrics_on_known_values():
    assert score("accuracy", [1, 0, 1, 1], [1, 0, 0, 1]) == 0.75
    assert score("f1", [1, 0, 1, 1], [1, 0, 0, 1]) == pytest.approx(0.8)
    assert score("matthews", [1, 0, 1, 0], [1, 0, 1, 0]) == 1.0
    assert score("spearman", [1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert score("pearson", [1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert score("spearman", [2, 2, 2], [1, 2, 3]) == 0.0  # constant prediction


def test_companion_scores_and_unknown_metric():
    assert set(all_scores("f1", [1, 0], [1, 0])) == {"f1", "accuracy"}
    assert set(all_scores("spearman", [1, 2], [1, 2])) == {"spearman", "pearson"}
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", [1], [1])
