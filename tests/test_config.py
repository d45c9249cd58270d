"""dcr_fast.config: dataclass <-> YAML <-> flags, and the shipped configs."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from dcr_fast.config import (
    add_config_arguments,
    config_from_args,
    config_from_dict,
    config_to_dict,
    load_yaml,
    resolve_config_path,
    save_yaml,
    shipped_configs,
)


@dataclasses.dataclass
class Toy:
    name: str = "a"
    steps: int = 3
    lr: float = 1e-4
    lora: bool = True
    files: list[str] = dataclasses.field(default_factory=list)
    limit: int | None = None
    tag: str | None = None


def parse(argv: list[str]) -> Toy:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Toy)
    return config_from_args(Toy, parser.parse_args(argv), section="train")


def test_defaults_when_nothing_given():
    assert parse([]) == Toy()


def test_flags_mirror_fields_and_convert_types():
    config = parse(["--name", "b", "--steps", "7", "--lr", "3e-3", "--no-lora", "--files", "x.jsonl", "y.jsonl",
                    "--limit", "5", "--tag", "none"])
    assert config == Toy(name="b", steps=7, lr=3e-3, lora=False, files=["x.jsonl", "y.jsonl"], limit=5, tag=None)


def test_tuple_fields_come_back_as_tuples():
    @dataclasses.dataclass
    class Sizes:
        sizes: tuple[int, ...] = (1, 2)
        names: tuple[str, ...] | None = None

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Sizes)
    assert config_from_args(Sizes, parser.parse_args([])) == Sizes()
    config = config_from_args(Sizes, parser.parse_args(["--sizes", "8", "16", "--names", "a"]))
    assert config.sizes == (8, 16) and config.names == ("a",)


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 10\nlr: 0.5\nfiles: [a.jsonl]\n")
    config = parse(["--config", str(path), "--lr", "0.25"])
    assert (config.steps, config.lr, config.files, config.name) == (10, 0.25, ["a.jsonl"], "a")


def test_sectioned_yaml_picks_the_command_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("description: two stages\ntrain: {steps: 4}\nother: {steps: 9}\n")
    assert parse(["--config", str(path)]).steps == 4
    with pytest.raises(ValueError, match="no 'missing' section"):
        load_yaml(str(path), "missing")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"stepz": 1}, "unknown config field.*stepz"),
        ({"steps": "many"}, "'steps' expected int"),
        ({"steps": 2.5}, "'steps' expected int"),
        ({"lr": True}, "'lr' expected float"),
        ({"lora": "maybe"}, "'lora' expected true or false"),
        ({"name": None}, "'name' may not be empty"),
        ({"files": 3}, "'files' expected a list"),
    ],
)
def test_bad_values_name_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(Toy, values)


def test_missing_or_malformed_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither a file nor a shipped config"):
        parse(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ValueError, match="does not exist"):
        load_yaml(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_yaml(str(bad))


def test_round_trip_through_yaml(tmp_path):
    config = Toy(name="z", steps=1, lr=0.1, lora=False, files=["f"], limit=None, tag="t")
    save_yaml(config, str(tmp_path / "saved.yaml"))
    assert config_from_dict(Toy, load_yaml(str(tmp_path / "saved.yaml"))) == config
    assert config_to_dict(config)["files"] == ["f"]


@pytest.mark.parametrize("name", ["qwen2.5-1.5b", "qwen2.5-7b", "llama-3-8b", "tiny", "tiny-ci"])
def test_shipped_configs_build_their_stage_configs(name):
    from dcr_fast.demo.run import DemoConfig
    from dcr_fast.train.dcr import DCRConfig
    from dcr_fast.train.sft import SFTConfig

    assert name in shipped_configs()
    path = resolve_config_path(name)
    sft = config_from_dict(SFTConfig, load_yaml(path, "sft"))
    dcr = config_from_dict(DCRConfig, load_yaml(path, "dcr"))
    assert sft.lora and (sft.lora_r, sft.lora_alpha, sft.lora_dropout) == (8, 32, 0.05)
    assert (dcr.margin, dcr.gamma, dcr.variant, dcr.nll_weight, dcr.batch_size) == (0.25, 16.0, "dcr", 0.001, 32)
    if name.startswith("tiny"):
        config_from_dict(DemoConfig, load_yaml(path, "demo"))
        config_from_dict(SFTConfig, load_yaml(path, "pretrain"))
    else:
        assert (sft.lr, sft.micro_batch_size * sft.grad_accum, sft.warmup_ratio) == (1e-4, 128, 0.03)
        assert dcr.lr == 1e-4 and dcr.layer == (15 if name == "llama-3-8b" else 13)
        if name != "qwen2.5-1.5b":  # the 7B/8B settings name the sharding their full-parameter DCR needs
            assert (dcr.sharding, dcr.lora, sft.sharding) == ("fsdp", False, "ddp")
