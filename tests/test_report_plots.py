"""The search report's tables and plots read without the table: no gaps, no flat axes, labels (issue 12)."""
from __future__ import annotations

from tune.results import _parallel_frame, parent_summary, table
from tune.settings import SearchSettings
from tune.trial_spec import trial_spec


def _trial(tid, cfg, final):
    spec = trial_spec(SearchSettings(baseline="b.pt", data="d", out="o"), cfg)
    return {"trial_id": tid, "spec": spec, "final": final, "reports": [final or {"val_top1": 30.0}], "failed": False}


def test_parallel_axes_have_a_value_for_every_trial_and_no_flat_axis():
    trials = [
        _trial("a", {"w_bits": 8, "a_bits": 8, "method": "ptq"}, {"val_top1": 60.0, "test_top1": 59.0, "comp_mb": 0.8, "ratio": 3.5}),
        _trial("b", {"w_bits": 4, "a_bits": 8, "method": "qat", "qat_lr": 0.01, "qat_epochs": 1},
               {"val_top1": 55.0, "test_top1": 54.0, "comp_mb": 0.46, "ratio": 6.0}),
        _trial("c", {"w_bits_b00": 4, "w_bits_b01": 7, "a_bits": 8, "method": "ptq"},
               {"val_top1": 50.0, "test_top1": 49.5, "comp_mb": 0.5, "ratio": 5.6}),
        _trial("d", {"w_bits": 2, "a_bits": 8, "method": "qat", "qat_lr": 0.02, "qat_epochs": 1}, None),  # stopped
    ]
    df = table(trials)
    assert list(df["status"]) == ["done", "done", "done", "stopped"]
    num, fixed = _parallel_frame(df[df["status"] == "done"])
    assert not num.isna().any().any()  # PTQ's lr and qat_epochs are 0, a mixed trial's W_bits its mean
    assert list(num["lr"]) == [0.0, 0.01, 0.0] and list(num["W_bits"]) == [8.0, 4.0, 5.5]
    assert "A_bits" not in num and fixed == {"A_bits": 8.0}  # the same for all: named, not drawn flat
    assert list(df["label"]) == ["W8A8 ptq", "W4A8 qat lr=0.01", "W4-7A8 ptq", "W2A8 qat lr=0.02"]


def test_parent_summary_names_the_best_trial_and_the_front():
    summary = {"experiment": "runs/s", "trials": [{"trial_id": "a", "status": "done"}, {"trial_id": "b", "status": "stopped"}],
               "best": {"trial_id": "a", "label": "W4A8 ptq", "W_bits": 4, "A_bits": 8, "method": "ptq", "Val_Acc": 61.234, "Accuracy": 60.5,
                        "comp_kb": 463.4, "Ratio": 6.05, "val_top1": 61.234, "top1": 60.5, "comp_mb": 0.4634},
               "pareto": [{"trial_id": "a", "label": "W4A8 ptq", "W_bits": 4, "A_bits": 8, "method": "ptq", "Val_Acc": 61.234,
                           "Accuracy": 60.5, "comp_kb": 463.4, "Ratio": 6.05}]}
    metrics, note = parent_summary(summary)
    assert metrics == {"trials": 2, "trials_done": 1, "pareto_trials": 1, "best_test_top1": 60.5,
                       "best_val_top1": 61.234, "best_comp_mb": 0.4634, "best_comp_kb": 463.4}
    assert "| a | W4A8 ptq | 61.23 | 60.50 | 463.4 | 6.05 |" in note and "1 of 2 trials done" in note
