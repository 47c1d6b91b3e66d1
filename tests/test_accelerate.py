"""Many GPUs: the shipped accelerate configs, and a training step re-run under `accelerate launch`.

No GPU here: the configs are checked with accelerate's own parsers (as `accelerate launch` reads them), and the
launch path runs for real with one CPU process (accelerate needs mpirun for several CPU processes).
"""

import json
from pathlib import Path

import pytest
from datasets import Dataset

from pipeline import training
from pipeline.artifacts import Artifact, Output
from pipeline.steps import redi, sft

CONFIGS = Path("recipes/accelerate")
EXPECTED = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp": "FSDP"}


def parsed_launch(config_file, num_processes=1):
    """accelerate's own reading of the command our training steps run."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    cfg = sft.Config(uses="sft", input="d", model="builtin:tiny-random", accelerate_config=str(config_file),
                     num_processes=num_processes)
    command = training.launch_command(cfg, Path("payload.json"))
    # Every training step launches the shared entry point; the payload names the step type whose `train` it runs.
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and command[-3:] == ["-m", "pipeline.training",
                                                                                      "payload.json"]
    return _validate_launch_command(launch_command_parser().parse_args(command[3:]))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_configs_are_what_accelerate_launch_reads(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.value == EXPECTED[name] and config.num_machines == 1 and not config.use_cpu

    args, defaults, mixed_precision_from_config = parsed_launch(path, num_processes=4)
    assert args.num_processes == 4  # the recipe's num_processes overrides the file's
    assert (args.use_deepspeed, args.use_fsdp) == (EXPECTED[name] == "DEEPSPEED", EXPECTED[name] == "FSDP")
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_load_into_accelerates_plugin(stage, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    path = CONFIGS / f"zero{stage}.yaml"
    args, defaults, mixed_precision_from_config = parsed_launch(path, num_processes=8)
    ds_file = Path(defaults.deepspeed_config["deepspeed_config_file"])
    assert ds_file == CONFIGS / f"ds_zero{stage}.json" and ds_file.exists()
    ds_config = json.loads(ds_file.read_text())
    assert ds_config["zero_optimization"]["stage"] == stage
    # The Trainer fills these in, so batch size, accumulation and precision are the recipe's.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds_config[key] == "auto"
    assert ds_config["bf16"]["enabled"] == "auto"

    # What `accelerate launch` tells each process (commands/launch.py); the plugin refuses a config file together with
    # settings the file owns (mixed_precision, zero_stage, ...), which is why the YAMLs leave them out.
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", ",".join(fields))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    plugin = DeepSpeedPlugin(hf_ds_config=str(ds_file), zero3_init_flag=defaults.deepspeed_config["zero3_init_flag"])
    assert plugin.zero_stage == stage and plugin.hf_ds_config.is_zero3() == (stage == 3)
    if stage == 3:
        assert ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_a_training_step_runs_under_accelerate_launch(tmp_path):
    rows = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "chosen": [{"role": "assistant", "content": f"\\boxed{{{2 * i}}}"}],
             "rejected": [{"role": "assistant", "content": f"\\boxed{{{2 * i + 1}}}"}]} for i in range(4)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "pairs" / "data"))
    single_process = tmp_path / "single.yaml"
    single_process.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: 'no'\n"
                              "num_machines: 1\nnum_processes: 1\nuse_cpu: true\n")
    cfg = redi.Config(uses="redi", input="pairs", model="builtin:tiny-random", lora={"r": 4}, max_steps=2,
                      batch_size=2, logging_steps=1, max_length=64, accelerate_config=str(single_process))
    assert training.runs_distributed(cfg)
    out = Output(name="redi", kind="model", dir=tmp_path / "redi", scratch=tmp_path / "scratch", seed=0)
    out.dir.mkdir()
    out.scratch.mkdir()

    artifact = redi.run(cfg, {"pairs": Artifact("pairs", "dataset", tmp_path / "pairs")}, out)
    assert artifact.stats["steps"] == 2 and artifact.stats["rows"] == 4 and artifact.stats["processes"] == 1
    assert (out.model_dir / "adapter_model.safetensors").exists()
    assert "with REDI" in (out.model_dir / "README.md").read_text()  # redi's own `train` ran under the launch
    assert json.loads((out.scratch / "launch.json").read_text())["uses"] == "redi"
