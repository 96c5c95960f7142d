"""The experiments' pipelines end to end at the smoke scale (2 steps per phase, tiny model, 1 seed):
every arm and phase is measured with finite values, the schedules do what each arm says, and the
README table regenerated from the results JSON shows the JSON's numbers. Plus the report's statistics."""
import json
import math
import os
import re
import shutil

import pytest

from ul2lab.errors import UserError
from ul2lab.experiments import __main__ as experiments_cli
from ul2lab.experiments import continual_tables, harness, objectives, report, runner, schedules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("compilation_cache")  # tests/conftest.py


def run_smoke(name, tmp_path, s=None, **kwargs):
    """runner.run at the smoke scale, seed 0, into tmp_path (results, README copy, checkpoints)."""
    readme = tmp_path / "README.md"
    shutil.copy(os.path.join(harness.experiment_dir(name), "README.md"), readme)
    out = runner.run(name, s or harness.scale("smoke"), [0], str(tmp_path / "work"), str(tmp_path / "results"),
                     str(readme), **kwargs)
    with open(tmp_path / "results" / "smoke-seed0.json") as f:
        result = json.load(f)
    return out, result, readme.read_text()


def table_cells(readme_text):
    """{(table title, row label, column label): cell text} of the generated section's tables."""
    cells, title, header = {}, None, None
    for line in report.generated_section(readme_text).splitlines():
        if line.startswith("**"):
            title, header = line.strip("*"), None
        elif line.startswith("| |"):
            header = [c.strip() for c in line.strip("|").split("|")][1:]
        elif line.startswith("| ") and header and not line.startswith("|---"):
            row = [c.strip() for c in line.strip("|").split("|")]
            cells.update({(title, row[0], col): cell for col, cell in zip(header, row[1:])})
    return cells


def assert_tables_show_the_json(result, readme_text, sections):
    """Each cell of each generated table is the JSON's measurement (1 seed: the value itself)."""
    cells = table_cells(readme_text)
    checked = 0
    for section in sections:
        digits = section.get("digits", 3)
        for row, row_label in section["rows"]:
            for metric, column_label in section["columns"]:
                cell = cells[(section["title"], row_label, column_label)]
                key = f"{row}/{metric}"
                if key in result["measurements"]:
                    assert float(cell) == pytest.approx(result["measurements"][key], abs=10 ** -digits)
                    checked += 1
                else:
                    assert cell == "—"
    assert checked == len(result["measurements"])


def assert_losses_plausible(values):
    """Cross entropy per token of a tiny model after a few steps: positive, finite, near ln(vocab)."""
    for value in values:
        assert math.isfinite(value) and 0.5 < value < 3 * math.log(harness.EMBEDDED_VOCAB_MODEL_SIZE), value


def test_objectives_smoke(tmp_path, ul2lab_cache_dir):
    out, result, readme_text = run_smoke("objectives", tmp_path)
    expected = {f"{arm}/{other}_loss" for arm in objectives.OBJECTIVES for other in objectives.OBJECTIVES}
    expected |= {f"ul2/{probe}" for probe in objectives.PROBES}
    assert set(result["measurements"]) == expected
    assert_losses_plausible(result["measurements"].values())
    assert result["measurements"]["ul2/mode_right"] == result["measurements"]["ul2/ul2_loss"]
    # the probe variants are other examples: a different loss from the right-token examples
    assert result["measurements"]["ul2/mode_none"] != result["measurements"]["ul2/mode_right"]
    for arm in objectives.OBJECTIVES:
        assert [p["step"] for p in result["curves"][arm]] == [1, 2]
        assert_losses_plausible(p["loss"] for p in result["curves"][arm])
    assert result["scale"]["name"] == "smoke" and result["seed"] == 0
    assert_tables_show_the_json(result, readme_text, objectives.SECTIONS)
    assert "too few seeds for an interval" in readme_text  # one seed: no interval is claimed
    with open(out["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# 2 steps of each main phase and anneal branches of 2 steps from step 2 (a 1-step branch would run
# at the constant rate: the anneal's first step is the constant, so it would equal the main run)
SCHEDULES_SMOKE = harness.scale("smoke", steps_per_phase=4, anneal_steps=2)


def test_schedules_smoke(tmp_path, ul2lab_cache_dir):
    s = SCHEDULES_SMOKE
    _, result, readme_text = run_smoke("schedules", tmp_path, s)
    m = result["measurements"]
    expected = {f"{arm}@{i}/{data}_loss" for arm in schedules.ARMS for i in (1, 2, 3)
                for data in (["text"] if i == 1 else ["tables", "text"])}
    assert set(m) == expected
    assert_losses_plausible(m.values())
    curves = result["curves"]
    for arm in ("cosine", "infinite"):
        assert [[p["step"] for p in phase] for phase in curves[arm]] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
        assert_losses_plausible(p["loss"] for phase in curves[arm] for p in phase)
    # repeated cosine re-warms: each phase starts at the peak and ends near the end rate
    for phase in curves["cosine"]:
        assert phase[0]["learning_rate"] == pytest.approx(s.peak_learning_rate, rel=1e-5)
        assert phase[-1]["learning_rate"] < phase[0]["learning_rate"]
    # the infinite schedule continues across phases: phases 2 and 3 stay at the constant rate
    for phase in curves["infinite"][1:]:
        assert all(p["learning_rate"] == pytest.approx(s.constant_learning_rate, rel=1e-5) for p in phase)
    # each anneal branch ends at the phase's last step, below the constant rate
    for i, phase in enumerate(curves["infinite_anneal"], 1):
        assert phase[-1]["step"] == i * s.steps_per_phase
        assert [p["step"] for p in phase] == [i * 4 - 1, i * 4]
        assert phase[-1]["learning_rate"] < s.constant_learning_rate
        # the branch is another model than the main run at the same step
        assert m[f"infinite_anneal@{i}/text_loss"] != m[f"infinite@{i}/text_loss"]
    assert_tables_show_the_json(result, readme_text, schedules.SECTIONS)


def shared_data_dir():
    path = os.environ.get("UL2LAB_DATA_DIR") or os.path.join(REPO, "..", "shared", "data")
    if not os.path.isdir(os.path.join(path, "wikitq")) or not os.path.isdir(os.path.join(path, "tabfact")):
        if os.environ.get("CI"):
            pytest.fail(f"WikiTQ / TabFact not found at {path}; CI must run the continual_tables smoke test")
        pytest.skip(f"WikiTQ / TabFact not found at {path} (set UL2LAB_DATA_DIR)")
    return path


def test_continual_tables_smoke(tmp_path, ul2lab_cache_dir, monkeypatch):
    data_dir = shared_data_dir()
    monkeypatch.setenv("UL2LAB_DATA_DIR", "unset-by-the-test")  # runner.run sets it; undone after the test
    _, result, readme_text = run_smoke("continual_tables", tmp_path, data_dir=data_dir)
    m = result["measurements"]
    assert set(m) == {f"{arm}/{metric}" for arm in continual_tables.ARMS
                      for metric in ("text_loss", "tables_loss", "wikitq_accuracy", "tabfact_accuracy")}
    assert_losses_plausible(v for k, v in m.items() if k.endswith("_loss"))
    assert all(0.0 <= v <= 100.0 for k, v in m.items() if k.endswith("_accuracy"))
    # the continued arms moved away from the base checkpoint
    assert m["tables/tables_loss"] != m["none/tables_loss"] and m["text/text_loss"] != m["none/text_loss"]
    assert set(result["curves"]) == {"base", "tables", "text"}
    assert_tables_show_the_json(result, readme_text, continual_tables.SECTIONS)


def test_continual_tables_names_missing_data_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UL2LAB_DATA_DIR", "unset-by-the-test")  # runner.run sets it; undone after the test
    code = experiments_cli.main(["continual_tables", "--scale", "smoke", "--seeds", "0",
                                 "--data_dir", str(tmp_path / "nowhere"), "--work_dir", str(tmp_path / "work")])
    assert code == 2
    assert "random-split-1-train.tsv does not exist" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_bad_schedule_scale_is_refused_before_training(tmp_path):
    with pytest.raises(UserError, match="anneal_steps"):
        runner.run("schedules", harness.scale("smoke", anneal_steps=2), [0], str(tmp_path / "work"),
                   str(tmp_path / "results"))
    assert not (tmp_path / "work").exists()


# ---- the report's statistics -----------------------------------------------------------------

def test_mean_interval_is_the_student_t_interval():
    mean, half, n = report.mean_interval([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)  # t(0.975, 2) * sd / sqrt(n)
    mean, half, n = report.mean_interval([5.0])
    assert mean == 5.0 and math.isnan(half) and n == 1


def fake_results(pairs):
    return [{"seed": i, "scale": {"name": "reduced"}, "measurements": {"a/x": a, "b/x": b}}
            for i, (a, b) in enumerate(pairs)]


def test_finding_says_no_significant_difference_when_the_interval_contains_zero():
    noisy = fake_results([(1.0, 1.1), (1.2, 1.0), (0.9, 1.0)])
    assert "no significant difference at this scale" in report.finding(noisy, "a/x", "b/x", "x", True)
    clear = fake_results([(1.0, 2.0), (1.1, 2.1), (0.9, 2.05)])
    assert "a is better" in report.finding(clear, "a/x", "b/x", "x", lower_is_better=True)
    assert "b is better" in report.finding(clear, "a/x", "b/x", "x", lower_is_better=False)


def test_results_section_marks_a_reduced_scale_and_regenerates_identically(tmp_path):
    results = fake_results([(1.0, 2.0), (1.1, 2.1), (0.9, 2.05)])
    sections = [{"title": "T", "rows": [("a", "A"), ("b", "B")], "columns": [("x", "X")]}]
    text = report.results_section(results, sections, [("a/x", "b/x", "x", True)], None)
    assert "These numbers come from the `reduced` scale" in text and "`full` scale" in text
    assert "has not been run" in text
    smoke = report.results_section([dict(r, scale={"name": "smoke"}) for r in results], sections, [], None)
    assert "not from a configuration that measures anything" in smoke
    assert "| A | 1.000 ± 0.248 |" in text  # mean 1.0, sd 0.1, t(2) 4.303 / sqrt(3)
    readme = tmp_path / "README.md"
    readme.write_text(f"# t\n{report.BEGIN}\nold\n{report.END}\nafter\n")
    first = report.update_readme(str(readme), text)
    assert report.update_readme(str(readme), text) == first and first.endswith(f"{report.END}\nafter\n")
    (tmp_path / "bad.md").write_text("no markers")
    with pytest.raises(UserError, match="no results markers"):
        report.update_readme(str(tmp_path / "bad.md"), text)


def test_committed_readmes_match_their_results():
    """Each experiment's README results section is what the report makes of its committed JSON."""
    for name, experiment in runner.EXPERIMENTS.items():
        directory = harness.experiment_dir(name)
        with open(os.path.join(directory, "README.md")) as f:
            committed = report.generated_section(f.read())
        results = report.load_results(os.path.join(directory, "results"))
        scale = report.latest_scale(results)
        results = [r for r in results if r["scale"]["name"] == scale]
        plot = "results/results.png" if results else None
        expected = report.results_section(results, experiment.SECTIONS, experiment.COMPARISONS, plot)
        assert committed == expected, f"experiments/{name}/README.md is stale: run --report_only"
        assert bool(re.search(r"\d", committed)) == bool(results)  # no numbers without results


def test_scale_overrides_are_typed_and_unknown_fields_named():
    s = harness.scale("smoke", **harness.parse_overrides(["steps_per_phase=100", "peak_learning_rate=0.02"]))
    assert (s.steps_per_phase, s.peak_learning_rate, s.name) == (100, 0.02, "smoke")
    with pytest.raises(UserError, match="FIELD one of model, steps_per_phase"):
        harness.parse_overrides(["steps=3"])
    with pytest.raises(UserError, match="steps_per_phase takes a int"):
        harness.parse_overrides(["steps_per_phase=a lot"])
    with pytest.raises(UserError, match="unknown --scale 'huge'"):
        harness.scale("huge")
