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
    assert not num.isna().any().any()  # PTQ's lr and qat_epochs are 0, a mixed trial's w_bits its mean
    assert list(num["lr"]) == [0.0, 0.01, 0.0] and list(num["w_bits"]) == [8.0, 4.0, 5.5]
    assert "a_bits" not in num and fixed == {"a_bits": 8.0}  # the same for all: named, not drawn flat
    assert list(df["label"]) == ["W8A8 ptq", "W4A8 qat lr=0.01", "W4-7A8 ptq", "W2A8 qat lr=0.02"]


def test_parent_summary_names_the_best_trial_and_the_front():
    summary = {"experiment": "runs/s", "trials": [{"trial_id": "a", "status": "done"}, {"trial_id": "b", "status": "stopped"}],
               "best": {"trial_id": "a", "label": "W4A8 ptq", "w_bits": 4, "a_bits": 8, "method": "ptq", "val_top1": 61.234,
                        "test_top1": 60.5, "comp_kb": 463.4, "ratio": 6.05, "top1": 60.5, "comp_mb": 0.4634},
               "pareto": [{"trial_id": "a", "label": "W4A8 ptq", "w_bits": 4, "a_bits": 8, "method": "ptq", "val_top1": 61.234,
                           "test_top1": 60.5, "comp_kb": 463.4, "ratio": 6.05},
                          {"trial_id": "b", "label": "W2A8 qat lr=0.01", "w_bits": 2, "a_bits": 8, "method": "qat",
                           "val_top1": 40.0, "comp_kb": 231.0, "ratio": 12.1}]}
    metrics, note = parent_summary(summary)
    assert "| b | W2A8 qat lr=0.01 | 40.00 | - | 231.0 | 12.10 |" in note  # not measured: "-", never nan
    summary["pareto"] = summary["pareto"][:1]
    metrics, note = parent_summary(summary)
    assert metrics == {"trials": 2, "trials_done": 1, "pareto_trials": 1, "best_test_top1": 60.5,
                       "best_val_top1": 61.234, "best_comp_mb": 0.4634, "best_comp_kb": 463.4, "best_ratio": 6.05}
    assert "| a | W4A8 ptq | 61.23 | 60.50 | 463.4 | 6.05 |" in note and "1 of 2 trials done" in note


def test_one_vocabulary_and_no_nan_for_what_a_trial_did_not_measure():
    """Tables use the metric names (test_top1, val_top1, comp_mb, ...); a stopped trial's unmeasured values
    and a PTQ trial's lr are "-" in the report, and a PTQ trial logs no fine-tuning params to MLflow."""
    from tune.results import pareto_front, results_markdown
    trials = [
        _trial("a", {"w_bits": 8, "a_bits": 8, "method": "ptq"}, {"val_top1": 60.0, "test_top1": 59.0, "comp_mb": 0.8}),
        _trial("d", {"w_bits": 2, "a_bits": 8, "method": "qat", "qat_lr": 0.02, "qat_epochs": 1}, None),  # stopped
    ]
    df = table(trials)
    assert {"w_bits", "a_bits", "test_top1", "val_top1", "drop", "comp_mb", "ratio"} <= set(df.columns)
    assert not {"Accuracy", "Val_Acc", "Comp_MB", "W_bits", "A_bits", "objective"} & set(df.columns)
    md = results_markdown("runs/x", df, pareto_front(df))
    assert "nan" not in md.lower()
    row_a = next(ln for ln in md.splitlines() if ln.startswith("| a "))
    row_d = next(ln for ln in md.splitlines() if ln.startswith("| d "))
    assert [c.strip() for c in row_a.split("|")][7] == "-"  # lr column of the PTQ trial
    assert row_d.count(" - ") >= 6 and "stopped" in row_d
    ptq = trials[0]["spec"].params()
    assert not {"qat_lr", "qat_epochs", "kd_weight"} & set(ptq) and trials[1]["spec"].params()["qat_lr"] == 0.02


def test_pareto_front_drops_dominated_trials_and_keeps_ties_on_one_axis():
    import pandas as pd

    from tune.results import pareto_front
    df = pd.DataFrame({"trial_id": list("abcdef"), "status": ["done"] * 5 + ["stopped"],
                       "val_top1": [60.0, 55.0, 50.0, 60.0, 58.0, 99.0], "comp_mb": [0.8, 0.5, 0.5, 0.9, 0.5, 0.1]})
    # d: as accurate as a but larger; c and e: as small as b, e more accurate than b and c; f: not done
    assert list(pareto_front(df)["trial_id"]) == ["e", "a"]
