"""The splsm command's wrappers: clear errors before any stage work."""

from click.testing import CliRunner

from conftest import REPO
from splsm.cli import main

DEMO = str(REPO / "configs" / "tiny.yaml")


def test_every_stage_has_a_subcommand_with_workdir():
    for cmd in ("harvest", "generate", "build", "train", "evaluate", "run", "demo"):
        out = CliRunner().invoke(main, [cmd, "--help"])
        assert out.exit_code == 0 and "--workdir" in out.output, cmd
    for cmd in ("upstream", "downstream", "runs"):
        assert "--workdir" in CliRunner().invoke(main, ["lineage", cmd, "--help"]).output


def test_a_bad_config_is_reported_with_its_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncorpora: []\nmodels: {tiny: {}}\nharvest: {max_duration: 3}\n")
    out = CliRunner().invoke(main, ["harvest", "--config", str(bad), "--workdir", str(tmp_path)])
    assert out.exit_code != 0 and "bad.yaml" in out.output and "max_duration" in out.output


def test_a_stage_whose_input_is_missing_says_which_command_makes_it(tmp_path):
    out = CliRunner().invoke(main, ["build", "--config", DEMO, "--workdir", str(tmp_path)])
    assert out.exit_code != 0 and "transcripts" in out.output and "splsm harvest" in out.output
    out = CliRunner().invoke(main, ["train", "--config", DEMO, "--workdir", str(tmp_path)])
    assert out.exit_code != 0 and "splsm build" in out.output


def test_lineage_without_a_store_or_dataset_is_a_clear_error(tmp_path):
    out = CliRunner().invoke(main, ["lineage", "upstream", "x", "--workdir", str(tmp_path)])
    assert out.exit_code != 0 and "no lineage store" in out.output


def test_cli_stages_in_sequence_record_lineage(tmp_path):
    r = CliRunner()
    assert r.invoke(main, ["harvest", "--config", DEMO, "--workdir", str(tmp_path)]).exit_code == 0
    out = r.invoke(
        main,
        ["lineage", "downstream", str(REPO / "data" / "demo" / "LibriSpeech"), "--workdir", str(tmp_path)],
    )
    assert out.exit_code == 0 and "harvest/transcripts" in out.output and "rejects.parquet" in out.output
    out = r.invoke(main, ["lineage", "upstream", "nowhere", "--workdir", str(tmp_path)])
    assert out.exit_code != 0 and "no dataset recorded" in out.output
