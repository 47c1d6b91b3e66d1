"""Many GPUs and many machines: the shipped accelerate configs, and a training step re-run under `accelerate launch`.

No GPU here: the configs are checked with accelerate's own parsers (as `accelerate launch` reads them), and the
launch path runs for real with one CPU process (accelerate needs mpirun for several CPU processes). Several machines
are simulated by the environment each machine's launcher would set (NODE_RANK, MASTER_ADDR, ... or Slurm's).
"""

import json
import subprocess
from pathlib import Path

import pytest
from datasets import Dataset

from pipeline.commands.cli import main
from pipeline.core.artifacts import Artifact, Output
from pipeline.core.keys import plan
from pipeline.core.recipe import load_recipe
from pipeline.core.runner import run_recipe
from pipeline.steps import redi, sft
from pipeline.training import launch

CONFIGS = Path("recipes/accelerate")
EXPECTED = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp": "FSDP",
            "ddp_multinode": "MULTI_GPU", "zero3_multinode": "DEEPSPEED"}
MULTINODE = sorted(name for name in EXPECTED if name.endswith("_multinode"))
PER_MACHINE_ENV = ("NODE_RANK", "SLURM_NODEID", "NNODES", "SLURM_NNODES", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_launcher_environment(monkeypatch):
    """Each test sets the machine it simulates; none inherits a launcher's (a test run inside a Slurm job)."""
    for name in PER_MACHINE_ENV:
        monkeypatch.delenv(name, raising=False)


def on_machine(monkeypatch, **variables):
    for name in PER_MACHINE_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def parsed_launch(config_file, num_processes=1):
    """accelerate's own reading of the command our training steps run."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    cfg = sft.Config(uses="sft", input="d", model="builtin:tiny-random", accelerate_config=str(config_file),
                     num_processes=num_processes)
    command = launch.launch_command(cfg, Path("payload.json"))
    # Every training step launches the shared entry point; the payload names the step type whose `train` it runs.
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and command[-3:] == ["-m", "pipeline.training.launch",
                                                                                      "payload.json"]
    return _validate_launch_command(launch_command_parser().parse_args(command[3:]))


def test_every_shipped_config_is_tested():
    assert sorted(path.stem for path in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_configs_are_what_accelerate_launch_reads(name, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.value == EXPECTED[name] and not config.use_cpu
    # Nothing in a shipped file differs between machines: the rank and machine 0's address come at launch.
    assert config.machine_rank == 0 and config.main_process_ip is None
    assert config.num_machines == (2 if name in MULTINODE else 1)
    if name in MULTINODE:
        on_machine(monkeypatch, NODE_RANK="0", MASTER_ADDR="10.0.0.1")

    args, defaults, mixed_precision_from_config = parsed_launch(path, num_processes=4)
    assert args.num_processes == 4  # the recipe's num_processes overrides the file's
    assert (args.use_deepspeed, args.use_fsdp) == (EXPECTED[name] == "DEEPSPEED", EXPECTED[name] == "FSDP")
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3), ("zero3_multinode", 3)])
def test_deepspeed_configs_load_into_accelerates_plugin(name, stage, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    on_machine(monkeypatch, NODE_RANK="1", MASTER_ADDR="10.0.0.1")  # read by the multi-machine config only
    path = CONFIGS / f"{name}.yaml"
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


# ---- several machines ---------------------------------------------------------------------------------------------


def torchrun_arguments(args) -> dict:
    """What `accelerate launch` hands torchrun on this machine (accelerate.utils.launch, as its launchers call it)."""
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ""
        command, _ = prepare_deepspeed_cmd_env(args)
        assert command is None  # the `standard` launcher: torchrun on each machine, no pdsh from machine 0
    else:
        prepare_multi_gpu_env(args)
    return {"nnodes": args.nnodes, "node_rank": args.node_rank, "nproc_per_node": args.nproc_per_node,
            "rdzv_endpoint": args.rdzv_endpoint}


@pytest.mark.parametrize("name", MULTINODE)
def test_multinode_configs_take_each_machines_place_from_torchrun_variables(name, monkeypatch):
    on_machine(monkeypatch, NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    args, defaults, _ = parsed_launch(CONFIGS / f"{name}.yaml")
    assert (args.num_machines, args.machine_rank, args.main_process_ip) == (2, 1, "10.0.0.1")
    assert (args.num_processes, args.main_process_port) == (16, 29500)  # the file's: 16 over all machines, its port
    assert (args.use_deepspeed, args.multi_gpu) == (EXPECTED[name] == "DEEPSPEED", EXPECTED[name] == "MULTI_GPU")
    assert torchrun_arguments(args) == {"nnodes": "2", "node_rank": 1, "nproc_per_node": "8",
                                        "rdzv_endpoint": "10.0.0.1:29500"}


@pytest.mark.parametrize("name", MULTINODE)
def test_multinode_configs_under_slurm(name, monkeypatch):
    # srun's variables for the third of four machines; MASTER_ADDR comes from the sbatch script (scontrol)
    on_machine(monkeypatch, SLURM_NODEID="2", SLURM_NNODES="4", MASTER_ADDR="gpu-017", MASTER_PORT="29617")
    args, defaults, _ = parsed_launch(CONFIGS / f"{name}.yaml", num_processes=32)
    assert (args.num_machines, args.machine_rank, args.main_process_ip, args.main_process_port) == (4, 2, "gpu-017",
                                                                                                   29617)
    assert torchrun_arguments(args) == {"nnodes": "4", "node_rank": 2, "nproc_per_node": "8",
                                        "rdzv_endpoint": "gpu-017:29617"}
    on_machine(monkeypatch, SLURM_NODEID="2", NODE_RANK="3", NNODES="4", MASTER_ADDR="gpu-017")
    args, defaults, _ = parsed_launch(CONFIGS / f"{name}.yaml", num_processes=32)
    assert args.machine_rank == 3  # torchrun's name first


def test_a_single_machine_config_ignores_the_machine_variables(monkeypatch):
    on_machine(monkeypatch, NODE_RANK="1", NNODES="2", MASTER_ADDR="10.0.0.1")
    args, defaults, _ = parsed_launch(CONFIGS / "zero3.yaml", num_processes=8)
    assert (args.num_machines, args.machine_rank, args.main_process_ip) == (1, 0, None)


TRAIN_RECIPE = """\
name: multinode
seed: 1
workdir: {workdir}
steps:
  data: {{uses: tests.toy_steps, rows: 2}}
  train: {{uses: sft, input: data, model: "builtin:tiny-random", accelerate_config: {config}, num_processes: 4}}
  again: {{uses: sft, input: data, model: "step:train", accelerate_config: {config}, num_processes: 4}}
  after: {{uses: tests.toy_steps, input: data, rows: 1, model: "step:train"}}
"""


def write_recipe(tmp_path, config=CONFIGS / "zero3_multinode.yaml") -> Path:
    path = tmp_path / "multinode.yaml"
    path.write_text(TRAIN_RECIPE.format(workdir=tmp_path / "runs", config=config))
    return path


def test_every_machine_keys_the_step_the_same(tmp_path, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path))
    keys, commands = [], []
    for machine in ({"NODE_RANK": "0", "MASTER_ADDR": "host-a"},
                    {"NODE_RANK": "1", "MASTER_ADDR": "host-a"},
                    {"SLURM_NODEID": "1", "SLURM_NNODES": "4", "MASTER_ADDR": "host-b", "MASTER_PORT": "29617"}):
        on_machine(monkeypatch, **machine)
        keys.append({step.name: step.key for step in plan(recipe)})
        commands.append(launch.launch_command(recipe.steps["train"], Path("payload.json")))
    assert keys[0] == keys[1] == keys[2]
    assert len({tuple(command) for command in commands}) == 3  # while each machine launches its own part
    # The config file is part of the key: what differs per machine or per job must not be written in it.
    moved = tmp_path / "zero3_multinode.yaml"
    moved.write_text((CONFIGS / "zero3_multinode.yaml").read_text() + "main_process_ip: host-a\n")
    other = {step.name: step.key for step in plan(load_recipe(write_recipe(tmp_path, moved)))}
    assert other["data"] == keys[0]["data"] and other["train"] != keys[0]["train"]


def config_with_deepspeed_launcher(tmp_path, launcher: str) -> Path:
    import yaml

    settings = yaml.safe_load((CONFIGS / "zero3_multinode.yaml").read_text())
    settings["deepspeed_config"]["deepspeed_multinode_launcher"] = launcher
    path = tmp_path / "multinode_accelerate.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.mark.parametrize("machine, deepspeed_launcher, says", [
    ({"MASTER_ADDR": "10.0.0.1"}, "standard", "this machine's rank is not set: set NODE_RANK"),
    ({"NODE_RANK": "1"}, "standard", "machine 0's address is not set: set MASTER_ADDR"),
    ({"NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1"}, "standard", "machine rank 2 (from NODE_RANK) is not in 0..1"),
    ({"NODE_RANK": "one", "MASTER_ADDR": "10.0.0.1"}, "standard", "NODE_RANK='one' is not an integer"),
    ({"NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1", "NNODES": "3"}, "standard", "num_processes 4"),
    ({"NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1"}, "pdsh", "deepspeed_multinode_launcher: standard"),
])
def test_a_multinode_step_without_its_place_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys, machine,
                                                                            deepspeed_launcher, says):
    config = config_with_deepspeed_launcher(tmp_path, deepspeed_launcher)
    on_machine(monkeypatch, **machine)
    assert main(["run", str(write_recipe(tmp_path, config)), "--until", "train"]) == 2
    error = capsys.readouterr().err
    assert says in error and "sft: accelerate_config" in error, error
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def fake_launch(monkeypatch):
    """`accelerate launch` as seen from one machine: records each command and its payload; on machine 0 it writes
    what the main process would (the model and the stats), as `launched_main` does."""
    launches = []

    def run(command, **kwargs):
        payload = json.loads(Path(command[-1]).read_text())
        launches.append({"command": command, "payload": payload, "payload_path": Path(command[-1])})
        if command[command.index("--machine_rank") + 1] == "0":
            out = Path(payload["out"]["dir"])
            (out / "model").mkdir(parents=True)
            (out / "model" / "config.json").write_text("{}")
            (Path(payload["out"]["scratch"]) / launch.LAUNCH_RESULT).write_text(json.dumps({"steps": 2}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(launch.subprocess, "run", run)
    return launches


def snapshot(directory: Path) -> dict:
    """Every path under a directory with its size, modification time and inode: what a writer would change."""
    return {str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino)
            for path in sorted(directory.rglob("*"))}


def test_machines_other_than_0_join_the_launch_and_write_nothing_in_the_workdir(tmp_path, monkeypatch, fake_launch,
                                                                                 capsys):
    recipe_path = write_recipe(tmp_path)
    workdir = tmp_path / "runs"
    assert main(["run", str(recipe_path), "--until", "data"]) == 0  # stage 1, on one machine
    before = snapshot(workdir)
    assert ".lock" in before and "recipe.json" in before

    on_machine(monkeypatch, NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    assert main(["run", str(recipe_path), "--until", "train"]) == 0
    assert snapshot(workdir) == before  # no step dir, tmp or scratch dir, manifest, lock, cache or run page written
    (joined,) = fake_launch
    command = joined["command"]
    assert command[command.index("--machine_rank") + 1] == "1" and "10.0.0.1" in command
    assert not joined["payload_path"].exists() and not joined["payload_path"].is_relative_to(workdir)
    assert "machine 1 of 2 joins its training" in capsys.readouterr().out

    on_machine(monkeypatch, NODE_RANK="0", MASTER_ADDR="10.0.0.1")
    outcomes = run_recipe(load_recipe(recipe_path), until="train")
    assert outcomes["train"].state == "ran" and (workdir / "train" / "manifest.json").exists()
    machine_0 = fake_launch[1]
    assert machine_0["payload"] == joined["payload"]  # both machines run the same step on the same dirs
    assert joined["payload"]["out"]["dir"] == str(workdir / ".train.tmp")
    assert joined["payload"]["inputs"]["data"]["path"] == str(workdir / "data")

    # Once machine 0 has published the step, another machine's run finds nothing to join and still writes nothing.
    before = snapshot(workdir)
    on_machine(monkeypatch, NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    assert main(["run", str(recipe_path), "--until", "train"]) == 0
    assert snapshot(workdir) == before and len(fake_launch) == 2


@pytest.mark.parametrize("until, says", [("train", "step 'data' (tests.toy_steps) would run too"),
                                         (None, "step 'after' (tests.toy_steps) would run too"),
                                         ("again", "step 'again' (sft) reads train, which would run first")])
def test_machines_other_than_0_run_no_other_step(tmp_path, monkeypatch, fake_launch, capsys, until, says):
    recipe_path = write_recipe(tmp_path)
    if until != "train":  # the data step is complete; the steps after training are machine 0's or wait for it
        assert main(["run", str(recipe_path), "--until", "data"]) == 0
    on_machine(monkeypatch, NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    before = snapshot(tmp_path)
    assert main(["run", str(recipe_path)] + (["--until", until] if until else [])) == 2
    error = capsys.readouterr().err
    assert says in error and "--until train` on every machine" in error, error
    assert snapshot(tmp_path) == before and not fake_launch


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
    assert launch.runs_distributed(cfg)
    out = Output(name="redi", kind="model", dir=tmp_path / "redi", scratch=tmp_path / "scratch", seed=0)
    out.dir.mkdir()
    out.scratch.mkdir()

    artifact = redi.run(cfg, {"pairs": Artifact("pairs", "dataset", tmp_path / "pairs")}, out)
    assert artifact.stats["steps"] == 2 and artifact.stats["rows"] == 4 and artifact.stats["processes"] == 1
    assert (out.model_dir / "adapter_model.safetensors").exists()
    assert "with REDI" in (out.model_dir / "README.md").read_text()  # redi's own `train` ran under the launch
    assert json.loads((out.scratch / "launch.json").read_text())["train"] == "pipeline.steps.redi:train"
