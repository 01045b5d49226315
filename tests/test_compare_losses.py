"""bench/compare_losses.py's --a-curves: curves saved by one version of the code, read back by another."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("compare_losses", REPO / "bench" / "compare_losses.py")
compare_losses = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_losses)

SAVED = {"configs": {"A": {"FUSED_KERNELS": "none"}, "B": {}},
         "curves": {"A": [[6.0, 5.0, 4.0], [6.1, 5.1, 4.1]], "B": [[6.2, 5.2, 4.2], [6.3, 5.3, 4.3], [6.4, 5.4, 4.4]]}}


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps(SAVED))
    return path


def test_saved_curves_are_read_back_cut_to_the_seeds_and_steps_asked(saved):
    config, curves = compare_losses.saved_curves(str(saved), seeds=2, steps=2)
    assert curves == [[6.2, 5.2], [6.3, 5.3]]  # configuration B by default
    assert config == {"curves_from": f"{saved}:B"}
    config, curves = compare_losses.saved_curves(f"{saved}:A", seeds=2, steps=3)
    assert curves == SAVED["curves"]["A"]
    assert config == {"curves_from": f"{saved}:A", "FUSED_KERNELS": "none"}


@pytest.mark.parametrize("spec_suffix, seeds, steps, message", [
    (":C", 2, 2, "holds configurations ['A', 'B'], not 'C'"),
    (":A", 3, 2, "has fewer than 3 seeds of 2 steps"),
    ("", 2, 4, "has fewer than 2 seeds of 4 steps"),
])
def test_saved_curves_that_do_not_cover_the_comparison_are_refused(saved, spec_suffix, seeds, steps, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        compare_losses.saved_curves(f"{saved}{spec_suffix}", seeds=seeds, steps=steps)


@pytest.mark.parametrize("content", [None, "not json", json.dumps({"curves": {}})])
def test_a_file_that_is_not_a_saved_run_is_refused(tmp_path, content):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match="is not a file of compare_losses.py --json"):
        compare_losses.saved_curves(str(path), seeds=2, steps=2)


def test_cli_refuses_two_descriptions_of_a_and_says_why(saved, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["compare_losses.py", "--a", "RESIDUAL_FP32=1", "--a-curves", str(saved)])
    with pytest.raises(SystemExit) as exit_info:
        compare_losses.main()
    assert exit_info.value.code == 2
    assert "--a and --a-curves both describe configuration A" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["compare_losses.py", "--a-curves", f"{saved}:C", "--seeds", "2"])
    with pytest.raises(SystemExit):
        compare_losses.main()
    assert "--a-curves: " in capsys.readouterr().err
