"""The demo pipeline end to end at a tiny budget (the real budget is exercised by `make demo`)."""

import json

from PIL import Image

from admkit.cli import main
from admkit.cli.demo import SETTINGS


def test_demo_runs_end_to_end_and_reuses_finished_stages(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--minutes", "0.05", "--per_digit", "2"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["key"] for r in report["settings"]] == [s.key for s in SETTINGS]
    for row in report["settings"]:
        assert 0.0 <= row["judged_accuracy"] <= 1.0
        assert row["frechet_distance"] >= 0.0
        assert 0.0 <= row["precision"] <= 1.0 and 0.0 <= row["recall"] <= 1.0
        assert row["num_samples"] == 20
    grid = Image.open(out / "grid.png")
    assert grid.height > 24 * len(SETTINGS)  # one row per setting under the header
    assert (out / "loss.png").exists() and "| setting |" in (out / "report.md").read_text()
    assert (
        Image.open(out / "guidance.png").width > 0
        and "guidance.png" in (out / "report.md").read_text()
    )
    # Autoguidance runs the guide beside the model: twice the network evaluations.
    for row, setting in zip(report["settings"], SETTINGS):
        factor = 2 if setting.guide_scale != 1 else 1
        assert row["network_evals"] == factor * setting.steps, row["key"]
    assert any(setting.guide_scale != 1 for setting in SETTINGS)
    capsys.readouterr()

    # A rerun trains and samples nothing again.
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "diffusion: reusing" in printed and "classifier: reusing" in printed
    assert printed.count("reusing") == 3 + len(SETTINGS)


def test_demo_refuses_a_folder_of_other_files(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"
