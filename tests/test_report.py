"""eval.report: report.md holds the models x benchmarks table and details; the plots are real PNGs."""

from eval.metrics import benchmark_scores, compare_to_baseline
from eval.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_samples(model, benchmark, right_per_problem, n, **extra):
    return [{"model": model, "benchmark": benchmark, "id": f"{benchmark}-{p}", "sample_idx": i,
             "correct": i < right, "extracted": "1" if i < right else "2", "label": "correct" if i < right else
             "incorrect", "finish_reason": "stop", "completion_tokens": 10 + 5 * i + 50 * (i >= right), **extra}
            for p, right in enumerate(right_per_problem) for i in range(n)]


def test_report_and_plots(tmp_path):
    samples = (make_samples("base", "gsm8k", [1, 0, 0, 1], 2) + make_samples("tuned", "gsm8k", [2, 2, 1, 0], 2)
               + make_samples("base", "math500", [0, 1], 4, subject="Algebra", level=3)
               + make_samples("tuned", "math500", [4, 1], 4, subject="Algebra", level=3))
    models = {m: {b: benchmark_scores([s for s in samples if s["model"] == m and s["benchmark"] == b], n)
                  for b, n in (("gsm8k", 2), ("math500", 4))} for m in ("base", "tuned")}
    results = {"models": models, "comparisons": compare_to_baseline(models, "base", seed=0), "meta": {"seed": 1, "preset": "quick", "versions": {"vllm": "0.32.0"},
                                          "models": {"base": {"path": "/m/base", "weights_sha256": "ab" * 32}}}}
    paths = write_report(results, samples, tmp_path)

    assert sorted(p.name for p in paths) == ["accuracy.png", "lengths.png", "report.md"]
    for name in ("accuracy.png", "lengths.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    report = (tmp_path / "report.md").read_text()
    # side-by-side table; base gsm8k: rates 1/2, 0, 0, 1/2 -> 25.0, stderr sqrt((4 * 0.25^2 / 3) / 4) = 14.4
    assert "| model | gsm8k (n=2) | math500 (n=4) |" in report
    assert "| base | 25.0 ± 14.4 | 12.5 ± 12.5 |" in report
    assert "| tuned | 62.5 ± 23.9 | 62.5 ± 37.5 |" in report
    assert "pass@4" in report and "maj@4" in report and "by subject" in report and "by level" in report
    assert "/m/base" in report and "vllm 0.32.0" in report
    # paired: tuned - base on gsm8k, per problem 1/2, 1, 1/2, -1/2 -> +37.5 ± sqrt((1/8)^2 + (5/8)^2 + (1/8)^2
    # + (7/8)^2) / 3 / 4) = 31.5 points; MDD 2.80 x 31.5 = 88.1; the interval spans 0 with four problems
    assert "## Paired differences to `base`" in report
    assert "| gsm8k | tuned | +37.5 ± 31.5 | [" in report and "| 88.1 | 4 |" in report
    assert "no detectable difference" in report
    assert "Problems left out for every model (no graded sample): none." in report
