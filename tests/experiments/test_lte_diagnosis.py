"""The LTE diagnosis's reference rules: exit at the first layer within a tolerance of a reference."""

from __future__ import annotations

import numpy as np
import torch

from exitserve.experiments.lte_diagnosis import best_saved, oracle_frontier


def test_agreement_oracle_exits_at_the_first_layer_close_to_the_final_one():
    # 3 layers x 4 pairs; the final layer ranks the pairs as the labels do
    values = torch.tensor([[0.0, 1.4, 2.0, 9.0], [0.02, 1.3, 2.01, 3.0], [0.0, 1.0, 2.0, 3.0]])
    labels = np.array([0.0, 1.0, 2.0, 3.0])
    rows = {r["tolerance"]: r for r in oracle_frontier(values, values[-1], labels, "spearman")}
    # d = 0.05: pairs 1 and 3 exit at layer 1, pair 4 at layer 2, pair 2 at the last layer
    assert rows[0.05]["mean_exit_layer"] == 1.75 and rows[0.05]["score"] == 1.0
    assert rows[0.35]["mean_exit_layer"] == 1.5  # pair 2 now leaves at layer 2 (|1.3 - 1| < 0.35)
    assert rows[0.45]["mean_exit_layer"] == 1.25  # ... and at layer 1 (|1.4 - 1| < 0.45)
    assert rows[2.95]["mean_exit_layer"] == 1.25  # pair 4's layer 1 (9.0) is never within 2.95 of 3.0
    best = best_saved(list(rows.values()), 0.99)
    assert best is not None and best["layers_saved"] == 1 - 1.25 / 3 and best["score"] == 1.0
