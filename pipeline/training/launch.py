"""A training step's `run` (`train_here_or_launch`): the trainer in this process, or in `accelerate launch`
processes when the step asks for several GPUs or machines.

- several GPUs: `launch_distributed` writes the step's config, inputs and output dirs to a payload file and runs
  `python -m pipeline.training.launch <payload>` under `accelerate launch` (`launch_command`); in each process
  `launched_main` runs the payload's trainer, and the main process writes the stats read back;
- several machines: an accelerate config with `num_machines` above 1 takes each machine's rank and machine 0's
  address from the environment (`machine_placement`); machine 0's `distill run` runs the step as above, every other
  machine's joins the launch (`join_launch`) and writes nothing in the shared workdir.

Importing this module imports no torch, transformers, TRL or peft: the functions import what they need.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from pipeline.core.env import MACHINE_RANK_ENV, environment_int, machine_rank_from_environment, set_name
from pipeline.core.errors import UserError
from pipeline.training.tracking import TENSORBOARD_DIR, tracking_run

if TYPE_CHECKING:  # config imports this module (its checks read the accelerate config)
    from pipeline.training.config import TrainingConfig

# Written by the main process of an `accelerate launch`ed step: the stats the parent puts in the manifest.
LAUNCH_RESULT = "launch_result.json"


# ---- a training step's `run` ------------------------------------------------------------------------------------


def train_here_or_launch(cfg: TrainingConfig, inputs, out, train: Callable[..., dict]):
    """A training step's `run`: `train(cfg, inputs, out)` (the step's own, returning its manifest stats) in this
    process, or in `accelerate launch` processes when the step asks for several (or names an accelerate config)."""
    from pipeline.core.console import environment

    project, _ = tracking_run(out)
    # transformers' TensorBoard and W&B callbacks read their dir and project from the environment
    with environment(TENSORBOARD_LOGGING_DIR=str(out.dir / TENSORBOARD_DIR),
                     WANDB_PROJECT=os.environ.get("WANDB_PROJECT", project)):
        if runs_distributed(cfg):
            return launch_distributed(cfg, inputs, out, train)
        return out.model_written(**train(cfg, inputs, out))


# ---- several GPUs: the step re-runs itself under `accelerate launch` --------------------------------------------

# A multi-machine accelerate config (num_machines above 1) names no host and no rank: each machine's `distill run`
# takes them from the variables its launcher sets (torchrun's names first, then Slurm's), so the step's key (which
# fingerprints the config file) is the same on every machine and stays so when the job moves to other hosts.
MACHINES_ENV = ("NNODES", "SLURM_NNODES")  # machines taking part; unset: the config file's num_machines
MAIN_ADDRESS_ENV = "MASTER_ADDR"  # machine 0's address; unset: the config file's main_process_ip
MAIN_PORT_ENV = "MASTER_PORT"  # the port on machine 0; unset: the config file's main_process_port, else 29500


class MachinePlacement(NamedTuple):
    """This machine's place in a multi-machine launch: accelerate's --num_machines, --machine_rank,
    --main_process_ip and --main_process_port."""

    machines: int
    rank: int
    main_address: str
    main_port: int | None  # None: the config file's main_process_port, else accelerate's default


def runs_distributed(cfg: TrainingConfig) -> bool:
    return cfg.num_processes > 1 or cfg.accelerate_config is not None


def accelerate_settings(cfg: TrainingConfig) -> dict:
    """The step's accelerate config file, read as `accelerate launch` reads it (YAML or JSON); {} without one."""
    if not cfg.accelerate_config:
        return {}
    from pipeline.core import strict_yaml

    settings = strict_yaml.load_file(cfg.accelerate_config, "accelerate_config") or {}
    if not isinstance(settings, dict):
        raise UserError(f"accelerate_config {cfg.accelerate_config}: not a mapping of accelerate settings")
    return settings


def trains_across_machines(cfg: TrainingConfig) -> bool:
    """Whether the step's accelerate config asks for several machines (num_machines above 1)."""
    machines = accelerate_settings(cfg).get("num_machines") or 1
    if isinstance(machines, bool) or not isinstance(machines, int):
        raise UserError(f"accelerate_config {cfg.accelerate_config}: num_machines must be a whole number, got "
                        f"{machines!r}")
    return machines > 1


def launch_machines(cfg: TrainingConfig) -> int:
    """How many machines the step's launch spans: 1, or (multi-machine) the environment's count, else the file's."""
    if not trains_across_machines(cfg):
        return 1
    return (environment_int(MACHINES_ENV, f"{cfg.uses}: accelerate_config {cfg.accelerate_config}")
            or int(accelerate_settings(cfg)["num_machines"]))


def machine_placement(cfg: TrainingConfig) -> MachinePlacement | None:
    """This machine's place in the step's launch when its accelerate config trains across machines (None when it
    does not); a recipe error when the environment lacks this machine's rank or machine 0's address."""
    settings = accelerate_settings(cfg)
    if not trains_across_machines(cfg):
        return None
    where = (f"{cfg.uses}: accelerate_config {cfg.accelerate_config} trains across machines "
             f"(num_machines: {settings['num_machines']})")
    machines = launch_machines(cfg)
    rank = machine_rank_from_environment(where)
    if rank is None:
        raise UserError(f"{where}, and this machine's rank is not set: set {MACHINE_RANK_ENV[0]} (0 on machine 0, "
                        f"1..{machines - 1} on the others), or run under Slurm's srun, which sets "
                        f"{MACHINE_RANK_ENV[1]}")
    if not 0 <= rank < machines:
        raise UserError(f"{where}: machine rank {rank} (from {set_name(MACHINE_RANK_ENV)}) is not in "
                        f"0..{machines - 1}")
    main_address = os.environ.get(MAIN_ADDRESS_ENV) or settings.get("main_process_ip")
    if not main_address:
        raise UserError(f"{where}, and machine 0's address is not set: set {MAIN_ADDRESS_ENV} to the address of the "
                        "machine of rank 0 (the same on every machine)")
    total = cfg.num_processes if cfg.num_processes > 1 else int(settings.get("num_processes") or 1)
    if total % machines:
        raise UserError(f"{where}: num_processes {total} (the recipe's, else the file's) counts the processes of all "
                        f"machines together, as accelerate does, so it must be a multiple of the {machines} machines")
    deepspeed = settings.get("deepspeed_config") or {}
    if settings.get("distributed_type") == "DEEPSPEED" and deepspeed.get("deepspeed_multinode_launcher") != "standard":
        raise UserError(f"{where}: set deepspeed_config.deepspeed_multinode_launcher: standard in it; every machine "
                        "starts its own processes (`distill run` on each), none are started over ssh (pdsh)")
    return MachinePlacement(machines, rank, str(main_address), environment_int((MAIN_PORT_ENV,), where))


def launch_command(cfg: TrainingConfig, payload: Path) -> list[str]:
    """`accelerate launch` of this module's `launched_main` on the payload (which names the step's `train`)."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if cfg.accelerate_config:
        command += ["--config_file", str(Path(cfg.accelerate_config).resolve())]
    if cfg.num_processes > 1 or not cfg.accelerate_config:
        command += ["--num_processes", str(cfg.num_processes)]
    placement = machine_placement(cfg)
    if placement is not None:
        command += ["--num_machines", str(placement.machines), "--machine_rank", str(placement.rank),
                    "--main_process_ip", placement.main_address]
        if placement.main_port is not None:
            command += ["--main_process_port", str(placement.main_port)]
    return command + ["-m", "pipeline.training.launch", str(payload)]


def launch_payload(cfg: TrainingConfig, inputs, out, train: Callable[..., dict]) -> dict:
    """What each launched process needs to run the step's `train`: where the function and the config class are
    (importable `module:name`), the config, its inputs and its output dirs."""
    return {
        "train": f"{train.__module__}:{train.__qualname__}",
        "config_class": f"{type(cfg).__module__}:{type(cfg).__qualname__}",
        "config": cfg.model_dump(mode="json"),
        "inputs": {name: {"name": a.name, "kind": a.kind, "path": str(a.path), "key": a.key, "stats": a.stats}
                   for name, a in inputs.items()},
        "out": {"name": out.name, "kind": out.kind, "dir": str(out.dir), "scratch": str(out.scratch),
                "seed": out.seed, "dry_run": out.dry_run},
    }


def launch_distributed(cfg: TrainingConfig, inputs, out, train: Callable[..., dict]):
    """Run this step's `train` in `accelerate launch` processes, with the same output and scratch dirs.

    Every process trains; only the main one (of machine 0) writes the model and the stats file read back here.
    """
    payload = out.scratch / "launch.json"
    payload.write_text(json.dumps(launch_payload(cfg, inputs, out, train)))
    result = out.scratch / LAUNCH_RESULT
    result.unlink(missing_ok=True)
    command = _launch(cfg, payload)
    if not result.exists():
        raise RuntimeError(f"{cfg.uses}: `{' '.join(command)}` ended without its main process writing {result}; "
                           "its output is above")
    return out.model_written(**json.loads(result.read_text()))


def join_launch(cfg: TrainingConfig, inputs, out, train: Callable[..., dict]) -> None:
    """On a machine other than machine 0: this machine's processes of the step's launch, until training ends.

    The step's dirs (`out`) are machine 0's: its `distill run` clears them before launching and publishes them after,
    and only its main process writes there, so this machine's payload goes to a local temporary dir."""
    with tempfile.TemporaryDirectory(prefix="distill-launch-") as local:
        payload = Path(local) / "launch.json"
        payload.write_text(json.dumps(launch_payload(cfg, inputs, out, train)))
        _launch(cfg, payload)


def _launch(cfg: TrainingConfig, payload: Path) -> list[str]:
    """Run `accelerate launch` on the payload (its output goes where this process's does); the command run."""
    command = launch_command(cfg, payload)
    process = subprocess.run(command)
    if process.returncode != 0:
        raise RuntimeError(f"{cfg.uses}: `{' '.join(command)}` failed (exit code {process.returncode}); "
                           "its output is above")
    return command


def launched_main(payload_path: str) -> None:
    """Entry point of each `accelerate launch`ed process: run the payload's training step's `train`."""
    import datasets
    from accelerate import PartialState

    from pipeline.core.artifacts import Artifact, Output

    # As in the runner: `.map()` on a loaded dataset would write cache files into the input step's dir (shared by
    # every process, of every machine).
    datasets.disable_caching()
    payload = json.loads(Path(payload_path).read_text())
    train, config_class = (_named(payload[key]) for key in ("train", "config_class"))
    cfg = config_class(**payload["config"])
    inputs = {name: Artifact(**{**fields, "path": Path(fields["path"])}) for name, fields in payload["inputs"].items()}
    out_fields = payload["out"]
    out = Output(**{**out_fields, "dir": Path(out_fields["dir"]), "scratch": Path(out_fields["scratch"])})
    stats = train(cfg, inputs, out)
    if PartialState().is_main_process:
        (out.scratch / LAUNCH_RESULT).write_text(json.dumps(stats))


def _named(where: str):
    """The object an importable `module:qualified.name` names (the step hands its own over, so this layer imports
    no step)."""
    import importlib

    module, _, name = where.partition(":")
    found = importlib.import_module(module)
    for part in name.split("."):
        found = getattr(found, part)
    return found


if __name__ == "__main__":
    launched_main(sys.argv[1])
