"""Bad configs fail in `load_config`, before any model is built, naming the dotted field."""

import re

import pytest

from coat.config import ConfigError, expert_weight, flatten, from_yaml, load_config, to_yaml
from coat.model import CoATModel
from coat.model.coat_model import check_experts
from tests.conftest import SYNTHETIC_EXPERTS


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["thinking.num_slot=8"], "thinking.num_slot"),
        (["bogus.key=1"], "bogus"),
        (["thinking.num_slots=eight"], "thinking.num_slots"),
        (["thinking.num_slots=65"], "thinking.num_slots"),
        (["thinking.max_slots=4", "thinking.num_slots=8"], "thinking.num_slots"),
        (["experts.names=[pitch]", "loss.weights.speaker=1.0"], "loss.weights.speaker"),
        (["loss.weights.pitch=-0.5"], "loss.weights.pitch"),
        (["loss.ce_weight=-1"], "loss.ce_weight"),
        (["loss.distance.pitch=l3"], "loss.distance.pitch"),
        (["backbone.name=whisper"], "backbone.name"),
        (["backbone.checkpoint=/models/qwen"], "backbone.size"),
        (["thinking.placement=before_audio"], "thinking.placement"),
        (["heads.kind=mlp"], "heads.kind"),
        (["data.decode_tasks=0"], "data.decode_tasks"),
        (["heads.position=rotary"], "heads.position"),
        (["experts.names=[mel,reconstruction]"], "experts.names"),
        (["train.stages.0.train=[llm]"], "train.stages.0.train"),
        (["train.stages.0.train=[]"], "train.stages.0.train"),
        (["train.stages.1.lr.lora=0"], "train.stages.1.lr"),
        (["train.stages.1.weights.speaker=1"], "train.stages.1.weights.speaker"),
        (["train.stages.1.expert_scale_end=-1"], "train.stages.1.expert_scale_end"),
        (["lora.dropout=1.5"], "lora.dropout"),
        (["data.mixture=[{manifest: a/m.jsonl, weight: -1}]"], "data.mixture.0.weight"),
        (["eval.suites.mmau.rule=exact"], "eval.suites.mmau.rule"),
        (["train.stages.2.steps=5"], "train.stages.2.steps"),
        (["train.strategy=fsdp"], "train.stages"),
        (["backbone.checkpoints.whisper=/models/w"], "backbone.checkpoints.whisper"),
        (["heads.dim=30"], "heads.dim"),
        (["data.synth_test_share=0.25"], "data.synth_test_share"),
        (["data.mixture=[{weight: 2}]"], "data.mixture.0.manifest"),
        (["data.mixture=[{manifest: a/m.jsonl}, {manifest: a/n.jsonl}]"], "data.mixture"),
        (["train.stages=[]"], "train.stages"),
        (["tracking.log_every=0"], "tracking.log_every"),
        (["sweep.metric=loss"], "sweep.metric"),
        (["eval.baselines=[gpt]"], "eval.baselines"),
        (["eval.suites.mmau.metrics=[recall]"], "eval.suites.mmau.metrics"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        load_config(overrides=overrides)


def test_a_retired_field_says_what_replaced_it():
    """One token budget for every suite cut long LibriSpeech transcripts short: a suite's budget is its own."""
    with pytest.raises(ConfigError, match=r"'eval.max_new_tokens'.*eval.suites.<suite>.max_new_tokens"):
        load_config(overrides=["eval.max_new_tokens=64"])


def test_yaml_file_and_overrides(tmp_path, monkeypatch):
    path = tmp_path / "run.yaml"
    path.write_text("thinking:\n  num_slots: 8\nloss:\n  weights:\n    pitch: 0.5\n")
    cfg = load_config(path, ["thinking.placement=after_audio", "loss.ce_weight=0"])
    assert (cfg.thinking.num_slots, cfg.thinking.placement, cfg.loss.ce_weight) == (8, "after_audio", 0.0)
    assert cfg.loss.weights == {"pitch": 0.5}
    assert from_yaml(to_yaml(cfg)) == cfg
    assert flatten(cfg)["loss.weights.pitch"] == 0.5 and flatten(cfg)["thinking.num_slots"] == 8

    path.write_text("thinking:\n  num_slot: 8\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=re.escape("'thinking.num_slot' in run.yaml:")):  # the path as Path prints it
        load_config("./run.yaml")
    path.write_text("thinking:\n  num_slots: 99\n")
    with pytest.raises(ConfigError, match=r"'thinking.num_slots'"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_experts_are_checked_before_the_model_is_built():
    cfg = load_config(overrides=["experts.names=[pitch,phonetic]", "loss.distance.pitch=ce"])
    with pytest.raises(ConfigError, match="'loss.distance.pitch'"):
        check_experts(cfg, SYNTHETIC_EXPERTS)
    with pytest.raises(ConfigError, match="'experts.names'"):
        CoATModel(load_config(overrides=["experts.names=[pitch,formants]"]), SYNTHETIC_EXPERTS)


def test_roles_stand_for_their_default_experts_and_stages_take_dotted_overrides():
    cfg = load_config(overrides=["experts.names=[pitch,affect,sound-events,reconstruction,audio-encoder]",
                                 "experts.settings.sound-events.path=/models/ast",
                                 "train.stages.0.steps=7", "train.stages.1.weights.egemaps=0.5",
                                 "train.stages.1.lr.lora=1e-4"])
    assert cfg.experts.names == ["pitch", "egemaps", "sound-events", "mel", "audio-encoder"]
    assert load_config().experts.names == cfg.experts.names[:1] + ["phonetic"] + cfg.experts.names[1:4]
    assert (cfg.train.stages[0].steps, cfg.train.stages[0].train) == (7, ["slots", "heads"]), "LLM frozen first"
    assert cfg.train.stages[1].weights == {"egemaps": 0.5} and cfg.train.stages[1].lr == {"lora": 1e-4}
    assert expert_weight(cfg, "egemaps", cfg.train.stages[1]) == 0.5 and expert_weight(cfg, "egemaps") == 1.0
    settings = cfg.expert_settings
    assert settings["sound-events"] == {"path": "/models/ast"}
    assert settings["audio-encoder"]["backbone"] == "qwen2-audio", "the backbone's own encoder"
    assert from_yaml(to_yaml(cfg)) == cfg
    fsdp = load_config(overrides=["train.strategy=fsdp", "train.stages=[{steps: 2}, {steps: 3}]"])
    assert fsdp.train.total_steps == 5, "FSDP with stages that train the same groups"


def test_every_field_declares_its_help_and_the_reference_is_in_sync():
    from dataclasses import fields, is_dataclass
    from pathlib import Path

    from coat.config import CoATConfig, MixtureEntry, StageConfig, SuiteRecipe
    from coat.config_help import reference

    for node in (CoATConfig(), StageConfig(), MixtureEntry(), SuiteRecipe()):
        stack = [node]
        while stack:
            for f in fields(current := stack.pop()):
                assert f.metadata.get("help"), f"{type(current).__name__}.{f.name} has no help"
                if is_dataclass(value := getattr(current, f.name)):
                    stack.append(value)
    docs = Path(__file__).parents[1] / "docs" / "config.md"
    assert docs.read_text() == reference(), "docs/config.md is stale: coat config show --reference > docs/config.md"


def test_config_show_explains_every_field_and_loads_back_as_the_same_config(tmp_path, capsys):
    from coat.cli import main

    with pytest.raises(SystemExit) as done:
        main(["config", "show", "thinking.num_slots=8", "train.stages.0.steps=7", "data.max_seconds=4"])
    shown = capsys.readouterr().out
    assert done.value.code == 0
    lines = {line.split(":")[0].strip(): line for line in shown.splitlines()}
    assert lines["num_slots"].split("#")[0].strip() == "num_slots: 8"
    assert "K: thinking positions" in lines["num_slots"] and lines["num_slots"].endswith("[>= 0]")
    assert lines["long_clips"].endswith("[one of crop, reject]") and "[> 0]" in lines["max_seconds"]
    (tmp_path / "shown.yaml").write_text(shown)
    assert load_config(tmp_path / "shown.yaml") == load_config(
        overrides=["thinking.num_slots=8", "train.stages.0.steps=7", "data.max_seconds=4"])


def test_step_metrics_are_thinned_to_about_a_thousand_points_unless_told():
    """A 5,000-step run logs 1,000 points a metric by default; a short one logs every step; the setting wins."""
    assert load_config(overrides=["train.stages=[{steps: 5000}]"]).steps_between_logs == 5
    assert load_config(overrides=["train.stages=[{steps: 80}]"]).steps_between_logs == 1
    assert load_config(overrides=["train.stages=[{steps: 5000}]", "tracking.log_every=50"]).steps_between_logs == 50
