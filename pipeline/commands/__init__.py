"""The `distill` commands, the top layer: `cli` (argument parsing and `run`/`status`/`check`/`env`), `eval_command`
(`distill eval`), `compare`, `export`, `run_report/` (the run page), `steps_reference` (`distill steps`) and `bench/`
(`distill bench`)."""
