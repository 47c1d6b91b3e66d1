"""The recipe engine, the lowest layer: a recipe read and checked (`recipe`, `document`, `rounds`, `cross_step`), the
step base class and registry (`step`), step keys and why a step runs (`keys`), the workdir's layout, lock and
leftovers (`workdir`), running the plan (`runner`), what a step writes and reads (`artifacts`, `outputs`,
`fingerprints`), model references (`models`), the compute dtype (`compute_dtype`), the console, the environment and
errors. Imports nothing from the layers above (pyproject.toml's import-linter contracts)."""
