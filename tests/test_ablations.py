"""Tests for alexnet_mp.ablations: the plan, the figures from run records, the report, one real ablation."""
from __future__ import annotations

import json
import math

import pytest

from alexnet_mp.ablations import (COMPARISONS, RUNTIME, PlanError, RunResult, job_config, markdown, plan_runs,
                                  select, steps_to_error, summarise)
from alexnet_mp.ablations.__main__ import main as ablations_main
from alexnet_mp.ablations.measure import common_threshold, shown
from alexnet_mp.ablations.runner import Job, finished

from harness import SMALL_MODEL

# ---------------------------------------------------------------- planning


def test_every_comparison_of_the_paper_is_planned_with_its_claim():
    keys = {c.key for c in COMPARISONS}
    assert keys == {"activation", "lrn", "pool", "dropout", "pca", "columns"}
    for c in COMPARISONS:
        assert c.paper != c.other and c.claim
        # The arms differ in exactly the switch the comparison is about (plus shared settings).
        assert set(c.other.overrides) ^ set(c.paper.overrides)
    by_key = {c.key: c for c in COMPARISONS}
    assert "model.activation=tanh" in by_key["activation"].other.overrides
    assert "model.lrn.enabled=false" in by_key["lrn"].other.overrides
    assert "model.pool=plain" in by_key["pool"].other.overrides
    assert "model.dropout=0" in by_key["dropout"].other.overrides
    assert "data.pca_lighting=0" in by_key["pca"].other.overrides
    assert "model.columns=1" in by_key["columns"].other.overrides
    assert by_key["activation"].claimed["speedup"] == 6.0 and by_key["lrn"].claimed["top1"] == -1.4


def test_plan_trains_each_distinct_arm_once_per_seed():
    specs = plan_runs(select(None), [0, 1])
    names = [s.name for s in specs]
    assert len(names) == len(set(names)) == 14  # 7 distinct arms (the baseline and no-dropout are shared) x 2
    assert [s.seed for s in specs[:7]] == [0] * 7  # the first seed's set completes first
    assert all(f"train.seed={s.seed}" in s.overrides() for s in specs)
    only = plan_runs(select(["lrn", "pool"]), [3])
    assert [s.name for s in only] == ["baseline-seed3", "no-lrn-seed3", "plain-pool-seed3"]


@pytest.mark.parametrize("keys, seeds, match", [(["lrn", "nope"], [0], "unknown comparison nope"),
                                                (["lrn"], [0, 0], "distinct seeds"), (["lrn"], [], "distinct seeds")])
def test_bad_plans_are_refused_in_one_line(keys, seeds, match):
    with pytest.raises(PlanError, match=match) as e:
        plan_runs(select(keys), seeds)
    assert "\n" not in str(e.value)


def test_run_configs_put_the_arm_last_and_run_single_process(tmp_path):
    cfg = job_config(None, ["model.dropout=0.3", "data.pca_lighting=0.2"], ("data.pca_lighting=0", "train.seed=4"),
                     tmp_path, "x-seed4")
    assert cfg.dist.mp == 1 and cfg.dist.threads == 1 and "dist.mp=1" in RUNTIME
    assert cfg.model.dropout == 0.3 and cfg.data.pca_lighting == 0 and cfg.train.seed == 4
    assert cfg.run.name == "x-seed4" and cfg.run.out_dir == str(tmp_path)


# ---------------------------------------------------------------- figures from made-up records


def run(name, seed, errors=(), val=(), train=(), val5=None, every=10):
    """A RunResult with training error `errors` per step record and per-epoch top-1 errors."""
    steps = [{"step": every * (i + 1), "loss": 1.0, "top1": 1 - e} for i, e in enumerate(errors)]
    epochs = [{"epoch": i + 1, "step": every * len(errors), "train_loss": 1.0, "val_loss": 1.0,
               "train_top1": 1 - t, "val_top1": 1 - v, "val_top5": 1 - (val5 if val5 is not None else v / 2)}
              for i, (v, t) in enumerate(zip(val, train or val))]
    return RunResult(name, seed, epochs, steps)


def test_steps_to_error_uses_the_smoothed_training_error():
    steps = [{"step": 10 * (i + 1), "top1": 1 - e} for i, e in enumerate([0.9, 0.2, 0.9, 0.3, 0.25, 0.2, 0.1])]
    assert steps_to_error(steps, 0.25, smooth=1) == 20  # a lucky window counts without smoothing
    assert steps_to_error(steps, 0.25, smooth=3) == 60  # (0.3 + 0.25 + 0.2) / 3
    assert steps_to_error(steps, 0.05) is None


def test_speed_ratio_per_seed_with_censoring_and_a_common_threshold():
    c = next(c for c in COMPARISONS if c.key == "activation")
    relu = [run("relu", s, errors=[0.9, 0.5, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2], val=[0.3]) for s in (0, 1)]
    tanh = [run("tanh", 0, errors=[0.9, 0.9, 0.8, 0.6, 0.5, 0.45, 0.4, 0.4], val=[0.5]),
            run("tanh", 1, errors=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.3], val=[0.5])]
    row = summarise(c, relu, tanh, threshold=0.25)
    main = row["figures"]["at_threshold"]
    assert main["paper_steps"] == [50, 50] and main["other_steps"] == [None, None]
    assert main["lower_bound"] == [True, True] and main["speedup"] == [80 / 50, 80 / 50]  # tanh's total steps
    common = row["figures"]["at_common"]
    assert common["threshold"] == 0.45  # the lowest smoothed error every run reached, rounded up to 5 points
    assert all(r > 1 for r in common["speedup"])
    assert row["verdict"].startswith("shown: the paper's choice gives faster training")
    assert "at least" in row["measured"] and "6" not in row["verdict"]


def test_error_differences_are_paired_by_seed_and_judged_against_their_spread():
    c = next(c for c in COMPARISONS if c.key == "lrn")
    paper = [run("b", s, val=[0.6, v]) for s, v in ((0, 0.40), (1, 0.44))]
    other = [run("n", s, val=[0.6, v]) for s, v in ((0, 0.43), (1, 0.46))]
    row = summarise(c, paper, other)
    top1 = row["figures"]["top1"]
    assert top1["paper"]["values"] == pytest.approx([40, 44])
    assert top1["difference"]["values"] == pytest.approx([-3, -2])
    assert top1["difference"]["mean"] == pytest.approx(-2.5)
    assert top1["difference"]["sd"] == pytest.approx(math.sqrt(0.5))
    assert row["verdict"] == "shown: the paper's choice gives lower error"
    assert row["seeds"] == [0, 1] and "-2.5 points" in row["measured"]
    mixed = [run("n", s, val=[0.6, v]) for s, v in ((0, 0.43), (1, 0.42))]  # one seed each way
    assert summarise(c, paper, mixed)["verdict"].startswith("not shown at this scale")
    worse = [run("n", s, val=[0.6, v]) for s, v in ((0, 0.30), (1, 0.35))]
    assert summarise(c, paper, worse)["verdict"] == "shown, opposite to the paper"
    with pytest.raises(ValueError, match="different seeds"):
        summarise(c, paper, list(reversed(other)))


def test_overfitting_gap_is_validation_minus_training_error():
    c = next(c for c in COMPARISONS if c.key == "dropout")
    with_dropout = [run("b", s, val=[0.40], train=[0.38 + 0.01 * s]) for s in (0, 1)]
    without = [run("n", s, val=[0.45], train=[0.20 + 0.01 * s]) for s in (0, 1)]
    row = summarise(c, with_dropout, without)
    gap = row["figures"]["gap"]
    assert gap["paper"]["values"] == pytest.approx([2, 1]) and gap["other"]["values"] == pytest.approx([25, 24])
    assert row["verdict"] == "shown: the paper's choice gives less overfitting"


def test_effects_need_two_seeds_of_one_sign_beyond_twice_their_spread_and_the_floor():
    assert shown([-2.0, -2.2, -1.9]) and shown([1.0, 1.1])
    assert not shown([-2.0]) and not shown([-2.0, 0.1]) and not shown([-0.1, -5.0]) and not shown([4.0, 1.5])
    assert not shown([0.3, 0.35], floor=0.5) and shown([0.6, 0.65], floor=0.5)
    # Smoothed over the records so far: b gets to (0.9 + 0.8) / 2 at best.
    assert common_threshold([run("a", 0, errors=[0.9, 0.5]), run("b", 0, errors=[0.9, 0.8])]) == 0.85


def test_markdown_table_has_one_row_per_comparison_beside_the_claim():
    rows = [summarise(c, [run("a", s, val=[0.4 + s / 100], errors=[0.2] * 3) for s in (0, 1)],
                      [run("b", s, val=[0.45], errors=[0.5] * 3) for s in (0, 1)]) for c in COMPARISONS]
    meta = {"machine": "test box", "config": "small.yaml", "overrides": ["train.epochs=1"], "runtime": list(RUNTIME),
            "seeds": [0, 1], "runs": 14, "arms": 7, "parallel": 2, "wall_minutes": 3.0}
    text = markdown(rows, meta)
    table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 1 + len(COMPARISONS)
    for c, line in zip(COMPARISONS, table[1:]):
        assert c.title in line and c.claim in line
    assert "test box" in text and "seeds 0, 1" in text


# ---------------------------------------------------------------- one real ablation


TINY = [*SMALL_MODEL, "model.num_classes=4", "data.image_size=72", "data.resize=72", "data.train_size=48",
        "data.val_size=16", "train.batch_size=8", "train.epochs=1", "run.log_every=2"]


def test_tiny_ablation_writes_table_json_and_plot_and_keeps_finished_runs(tmp_path, capsys):
    args = ["--only", "lrn", "--seeds", "5", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
            "--machine", "test box", *TINY]
    assert ablations_main(args) == 0
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"ablations.md", "ablations.json", "ablations.png"}
    blob = json.loads((out / "ablations.json").read_text())
    assert [r["key"] for r in blob["rows"]] == ["lrn"] and blob["meta"]["seeds"] == [5]
    assert set(blob["runs"]) == {"baseline-seed5", "no-lrn-seed5"}
    assert blob["rows"][0]["verdict"].startswith("one seed")
    assert all(len(r["epochs"]) == 1 and r["steps"] for r in blob["runs"].values())
    assert "LRN on vs off" in (out / "ablations.md").read_text()
    assert (out / "ablations.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("*.part"))
    # Run again: every finished run is kept, not trained again.
    capsys.readouterr()
    assert ablations_main(args) == 0
    assert capsys.readouterr().out.count("kept (finished earlier") == 2


def test_a_finished_run_is_not_reused_under_another_config(tmp_path):
    cfg = job_config(None, TINY, ("train.seed=0",), tmp_path, "r")
    job = Job("r", cfg)
    assert not finished(job)  # no folder yet
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "summary.json").write_text("{}")
    assert not finished(job)  # a summary without records or config is not a finished run


# ---------------------------------------------------------------- the initialisation study


def test_init_study_reports_when_each_run_left_chance():
    from alexnet_mp.ablations.init_study import left_chance, table
    flat = run("paper", 0, val=[0.975, 0.975, 0.975])  # top-1 0.025 = chance for 40 classes
    learns = run("caffe", 0, val=[0.975, 0.96, 0.80])
    assert left_chance(flat, 40) is None and left_chance(learns, 40) == 3  # 0.20 > 2 / 40; 0.04 is not
    text = table({"paper": [flat], "caffe": [learns]}, 40)
    rows = [line for line in text.splitlines() if line.startswith("| paper") or line.startswith("| caffe")]
    assert "| never |" in rows[0] and "| 3 |" in rows[1]


def test_init_signal_sees_the_image_drowned_by_the_literal_inits_biases():
    from alexnet_mp.ablations.init_signal import layer_signal
    paper, caffe = layer_signal("paper", 67), layer_signal("caffe", 67)
    assert [r["layer"] for r in paper] == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    assert paper[0]["input_share"] > 0.9  # conv1 has no bias to hide behind: nearly all of it is the image
    for p, c in zip(paper, caffe):
        assert 0 <= p["input_share"] <= 1 and p["step"] > 0
    # Biases of 1 leave the fully connected layers a far smaller share of the image than 0.1 does.
    for name in ("fc6", "fc7"):
        p, c = (next(r for r in rows if r["layer"] == name) for rows in (paper, caffe))
        assert p["input_share"] < c["input_share"] / 3 and p["input_share"] < 1e-3
