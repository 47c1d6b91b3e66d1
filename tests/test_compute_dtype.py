"""The dtype decision (`pipeline.core.compute_dtype`) for each kind of device, with the capabilities injected, and how a
step's key and manifest carry it."""

import json

import pytest

from pipeline.commands.cli import main
from pipeline.core import compute_dtype, keys
from pipeline.core.compute_dtype import Hardware, choose
from pipeline.core.errors import UserError

AMX_CPU = Hardware("cpu", "Xeon (AMX)", cpu_bf16=True)
AVX2_CPU = Hardware("cpu", "EPYC (Zen 2)")
H100 = Hardware("cuda", "H100", cuda_capability=(9, 0))
A100 = Hardware("cuda", "A100", cuda_capability=(8, 0))
T4 = Hardware("cuda", "T4", cuda_capability=(7, 5))
MPS_14 = Hardware("mps", "Apple MPS", mps_bf16=True)
MPS_13 = Hardware("mps", "Apple MPS")


@pytest.mark.parametrize("hw, inference, training", [
    (AMX_CPU, "bfloat16", "bfloat16"),
    (AVX2_CPU, "float32", "float32"),
    (H100, "bfloat16", "bfloat16"),
    (A100, "bfloat16", "bfloat16"),
    (T4, "float16", "float16"),
    (MPS_14, "bfloat16", "float32"),
    (MPS_13, "float16", "float32"),
])
def test_auto_per_device(hw, inference, training):
    for use, expected in ((False, inference), (True, training)):
        choice = choose("auto", training=use, hw=hw)
        assert (choice.requested, choice.dtype, choice.slow) == ("auto", expected, None)
        assert hw.name in choice.reason


def test_reasons_say_why():
    assert "without AVX-512 BF16 or AMX" in choose(hw=AVX2_CPU).reason
    assert "compute capability 7.5" in choose(hw=T4).reason and "loss scaling" in choose(training=True, hw=T4).reason


def test_a_pinned_dtype_runs_as_asked_with_a_warning_where_slow():
    slow = choose("bfloat16", hw=AVX2_CPU)
    assert slow.dtype == "bfloat16" and slow.slow.startswith("bfloat16 on a CPU without native bf16")
    assert "~30x slower" in slow.slow and "use auto" in slow.slow
    assert choose("bfloat16", hw=AMX_CPU).slow is None and choose("float32", hw=AVX2_CPU).slow is None
    assert choose("bfloat16", hw=T4).slow is not None and choose("float16", hw=AVX2_CPU).slow is not None


def test_float16_training_off_cuda_is_refused():
    with pytest.raises(UserError, match="float16 training .* needs a CUDA GPU"):
        choose("float16", training=True, hw=AVX2_CPU)
    assert choose("float16", training=True, hw=T4).dtype == "float16"


def test_this_machine_reads_cpu_flags(monkeypatch):
    hw = compute_dtype.hardware()
    flags = compute_dtype.cpu_flags() or set()
    if hw.device == "cpu":
        assert hw.cpu_bf16 == bool(flags & {"avx512_bf16", "amx_bf16"})
    compute_dtype.hardware.cache_clear()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # torch told to use AVX2 kernels: no native bf16
    try:
        assert not compute_dtype.hardware().cpu_bf16
    finally:
        compute_dtype.hardware.cache_clear()


RECIPE = """
name: dtype
seed: 0
workdir: {workdir}
steps:
  model_step: {{uses: tests.toy_dtype_step}}
"""


def test_key_and_manifest_carry_the_choice(tmp_path, monkeypatch):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(workdir=tmp_path / "wd"))
    monkeypatch.setattr(compute_dtype, "hardware", lambda: AVX2_CPU)
    assert main(["run", str(path)]) == 0
    manifest = json.loads((tmp_path / "wd" / "model_step" / "manifest.json").read_text())
    assert manifest["inputs"]["dtype"] == "float32"
    assert manifest["dtype"] == {"requested": "auto", "dtype": "float32", "reason": choose(hw=AVX2_CPU).reason,
                                 "slow": None}
    from pipeline.core.recipe import load_recipe

    key_here = keys.plan(load_recipe(path))[0].key
    monkeypatch.setattr(compute_dtype, "hardware", lambda: AMX_CPU)  # the same recipe on a bf16 machine
    planned = keys.plan(load_recipe(path))[0]
    assert planned.key != key_here and planned.inputs["dtype"] == "bfloat16"
    assert planned.action == "run" and "dtype float32 -> bfloat16" in planned.reasons


def test_env_prints_the_choice(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "dtype: auto (inference)" in out and choose().dtype in out


def test_check_and_status_warn_about_a_slow_pinned_dtype(tmp_path, monkeypatch, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(workdir=tmp_path / "wd").replace("tests.toy_dtype_step}",
                                                                    "tests.toy_dtype_step, dtype: bfloat16}"))
    monkeypatch.setattr(compute_dtype, "hardware", lambda: AVX2_CPU)
    for command in ("check", "status"):
        assert main([command, str(path)]) == 0
        out = capsys.readouterr().out
        assert "step model_step: dtype bfloat16: bfloat16 on a CPU without native bf16" in out, command
    monkeypatch.setattr(compute_dtype, "hardware", lambda: AMX_CPU)
    assert main(["status", str(path)]) == 0 and "without native bf16" not in capsys.readouterr().out
    assert not (tmp_path / "wd" / "model_step").exists()  # warned, not run
