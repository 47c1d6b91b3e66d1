"""`distill bench decode`: the bounds on decode tokens/s on this machine.

A decode step of a dense transformer does about 2 FLOP per parameter per token (one multiply-add per weight; the
attention over a short context is left out), so at best

    tokens/s <= GFLOP/s / (2 * params)                  the compute bound (in fp32: decode_fraction_of_bound)
    tokens/s <= batch * bytes/s / (bytes of weights)    the memory-bandwidth bound: every decode step reads all
                                                        weights once for the whole batch

GFLOP/s is the best torch matmul measured here, in fp32 and bf16 (the two dtypes `dtype: auto` chooses between;
a CPU without AVX-512 BF16/AMX runs bf16 ~30x slower), at the decode shape (batch x hidden @ hidden x hidden) and a
large square. bytes/s is a large tensor copy (read + write). At the batches vLLM runs, the compute bound is the
lower (binding) one on a CPU.
"""

from __future__ import annotations

import time

MIN_SECONDS = 0.5  # time each kernel at least this long


def timed(fn) -> float:
    """Seconds per call of fn, repeated until MIN_SECONDS have passed (after one warm-up call)."""
    fn()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < MIN_SECONDS:
        fn()
        calls += 1
    return elapsed / calls


def matmul_gflops(m: int, k: int, n: int, dtype: str = "float32") -> float:
    import torch

    a, b = torch.randn(m, k, dtype=getattr(torch, dtype)), torch.randn(k, n, dtype=getattr(torch, dtype))
    return 2 * m * k * n / timed(lambda: torch.mm(a, b)) / 1e9


def copy_gbps(mib: int = 256) -> float:
    import torch

    src = torch.empty(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timed(lambda: dst.copy_(src)) / 1e9


def model_shape(model: str) -> tuple[int, int]:
    """(parameters, hidden size) of a model reference, from its config: no weights are loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.core.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model, {}))
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())  # tied: counted once
    return params, config.hidden_size


def measure(model: str, batch: int, square: int) -> dict:
    params, hidden = model_shape(model)
    decode_shape = {dtype: matmul_gflops(batch, hidden, hidden, dtype) for dtype in ("float32", "bfloat16")}
    square_shape = {dtype: matmul_gflops(square, square, square, dtype) for dtype in decode_shape}
    peak = max(*decode_shape.values(), *square_shape.values())
    peak_fp32 = max(decode_shape["float32"], square_shape["float32"])
    bandwidth = copy_gbps()
    return {
        "model": model,
        "params": params,
        "hidden": hidden,
        "batch": batch,
        "matmul_gflops_decode_shape": round(decode_shape["float32"], 2),
        "matmul_gflops_decode_shape_bf16": round(decode_shape["bfloat16"], 2),
        "matmul_gflops_peak": round(peak, 2),
        "copy_gbps": round(bandwidth, 2),
        "matmul_gflops_peak_fp32": round(peak_fp32, 2),
        "compute_bound_tokens_per_s": round(peak * 1e9 / (2 * params), 1),
        # float32: what every CPU computes natively, the bound `dtype: auto` runs against where bf16 is emulated
        "compute_bound_tokens_per_s_fp32": round(peak_fp32 * 1e9 / (2 * params), 1),
        # bf16 weights (2 bytes each)
        "memory_bound_tokens_per_s": round(batch * bandwidth * 1e9 / (2 * params), 1),
    }


def print_table(raw: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"distill bench decode — {raw['model']}, {raw['params'] / 1e6:.0f}M params")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(f"matmul GFLOP/s, fp32 {raw['batch']}x{raw['hidden']} @ {raw['hidden']}x{raw['hidden']}",
                  f"{raw['matmul_gflops_decode_shape']:.1f}")
    table.add_row("matmul GFLOP/s, bf16, same shape", f"{raw['matmul_gflops_decode_shape_bf16']:.1f}")
    table.add_row("matmul GFLOP/s, best (peak, fp32 or bf16)", f"{raw['matmul_gflops_peak']:.1f}")
    table.add_row("copy GB/s", f"{raw['copy_gbps']:.1f}")
    table.add_row("compute bound, tokens/s (peak / 2·params)", f"{raw['compute_bound_tokens_per_s']:.0f}")
    table.add_row("compute bound in fp32, tokens/s (fp32 peak / 2·params)",
                  f"{raw['compute_bound_tokens_per_s_fp32']:.0f}")
    table.add_row(f"memory bound, tokens/s (batch {raw['batch']}, bf16 weights)",
                  f"{raw['memory_bound_tokens_per_s']:.0f}")
    console.print(table)


def run(opts, console) -> tuple[dict, dict]:
    raw = measure(opts.model, min(opts.prompts * opts.n, 256), opts.matmul_size)
    print_table(raw, console)
    return raw, {}
