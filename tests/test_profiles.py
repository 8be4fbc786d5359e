"""The shipped profiles (configs/*.yaml) are valid as the commands read them: a typo in one fails here,
not in a user's first run."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from quantization import QuantConfig
from trainer import TrainConfig
from tune.settings import _check_options, _check_space, search_settings

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


SEARCH_ONLY = {"compose-test"}  # a search section only: make compose-test's search, run inside the stack


def test_the_shipped_profiles_are_the_documented_ones():
    assert {p.stem for p in CONFIGS} == {"quick", "cpu", "seed", "gpu"} | SEARCH_ONLY


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_section_of_a_profile_is_valid(path, tmp_path):
    doc = yaml.safe_load(path.read_text())
    assert set(doc) <= {"train", "quantize", "search", "sweep", "mixed"}, set(doc)
    if path.stem in SEARCH_ONLY:
        assert set(doc) == {"search"}
    else:
        assert TrainConfig.from_dict(doc["train"]).epochs >= 1  # every profile trains
    if "quantize" in doc:
        QuantConfig.from_dict(doc["quantize"])
    for mode, section in (("search", doc.get("search")), ("sweep", doc.get("sweep")), ("search", doc.get("mixed"))):
        if section is None:
            continue
        s = search_settings(mode, section, {}, {}, baseline=str(tmp_path / "b.pt"), data=str(tmp_path), out=str(tmp_path))
        _check_options(s)
        _check_space(s)


@pytest.mark.parametrize("mode, extra, params, metrics", [
    ("sweep", {"grid": {"w_bits": [8, 4]}}, ["w_bits", "a_bits"], ["comp_mb", "val_top1"]),
    ("search", {"space": {"w_bits": [2, 8], "method": ["qat", "lsq"]}}, ["w_bits", "a_bits", "qat_lr"],
     ["comp_mb", "val_top1"]),
    ("search", {"space": {"w_bits": [2, 8], "method": ["ptq", "qat"]}}, ["w_bits", "a_bits"], ["comp_mb", "val_top1"]),
    ("search", {"space": {"size_budget_mb": [0.3, 0.5], "method": ["ptq"]}}, ["a_bits"],
     ["avg_w_bits", "comp_mb", "val_top1"]),
])
def test_the_search_chart_has_only_axes_every_trial_has(mode, extra, params, metrics, tmp_path):
    s = search_settings(mode, extra, {}, {}, baseline=str(tmp_path / "b.pt"), data=str(tmp_path), out=str(tmp_path))
    assert s.chart_axes() == (params, metrics)
