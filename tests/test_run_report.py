"""`distill report`: the funnel, graph and curves from hand-made manifests (fast), and the page itself in headless
Chromium on a hand-made workdir: the browser pages through chunk files and filters from the URL hash.
tests/test_smoke.py checks the page of a real smoke run the same way."""

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeline.commands.run_report.curves import logged_curves
from pipeline.commands.run_report.funnel import funnel
from pipeline.commands.run_report.graph import graph_layout
from pipeline.commands.run_report.page import REPORT_DIR, write_run_report
from pipeline.commands.run_report.step_views import read_steps
from pipeline.core.errors import UserError
from pipeline.core.outputs import RUN_FILE, WORKDIR_MARK

DISTILL = str(Path(sys.executable).with_name("distill"))


# ---- headless Chromium, shared with tests/test_smoke.py -------------------------------------------------------------


def chromium() -> str:
    """The chromium binary; without one the page cannot be checked: a failure under CI, a skip elsewhere."""
    binary = shutil.which("chromium")
    if binary is None:
        message = ("chromium is not installed: the report page is checked in headless Chromium "
                   "(`apt-get install chromium`; .ci/run installs it)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


def open_page(page: Path, profile: Path, fragment: str = "", screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran (and its screenshot, if asked for), opened from disk as a user would."""
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    command = [chromium(), "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}",
               "--window-size=1400,2000", "--virtual-time-budget=5000"]
    if screenshot is not None:
        done = subprocess.run([*command, f"--screenshot={screenshot}", url], capture_output=True, text=True,
                              timeout=120)
        assert screenshot.is_file(), done.stderr[-2000:]
    done = subprocess.run([*command, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "</html>" in done.stdout, done.stderr[-2000:]
    return done.stdout


class Elements(HTMLParser):
    """Every element's tag, attributes and direct text, in document order."""

    def __init__(self, dom: str):
        super().__init__()
        self.found: list[dict] = []
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        self.found.append({"tag": tag, **dict(attrs), "text": ""})

    def handle_data(self, data):
        if self.found:
            self.found[-1]["text"] += data

    def where(self, **attributes) -> list[dict]:
        """Elements with these attributes (`class_` for class, `data_step` for data-step)."""
        return [e for e in self.found
                if all(e.get(k.rstrip("_").replace("_", "-")) == v for k, v in attributes.items())]


def funnel_rows(elements: Elements) -> dict[str, dict]:
    """step -> {rows, problems, counts: {stat: count}} of the funnel table, as the page shows it."""
    table, current = {}, None
    for element in elements.found:
        if element.get("class") == "funnel-stage":
            current = table[element["data-step"]] = {"rows": int(element["data-rows"]),
                                                      "problems": element["data-problems"], "counts": {}}
        elif current is not None and "data-stat" in element:
            current["counts"][element["data-stat"]] = int(element["data-count"])
    return table


def samples_shown(elements: Elements) -> list[dict]:
    return [e for e in elements.found if e["tag"] == "article"]


# ---- hand-made workdirs -------------------------------------------------------------------------------------------


def make_workdir(workdir: Path, steps: dict[str, dict]) -> Path:
    """A workdir as `distill run` leaves it: recipe.json, and a complete manifest for each step given `stats`
    (`steps`: name -> {uses, produces, stats, config, parents}; a step without stats has not run)."""
    workdir.mkdir(parents=True)
    (workdir / WORKDIR_MARK).write_text("")
    document = {"name": "handmade", "steps": {name: {"uses": s["uses"], **s.get("config", {})}
                                              for name, s in steps.items()}}
    (workdir / RUN_FILE).write_text(json.dumps({"recipe": "handmade.yaml", "steps": list(steps),
                                                "document": document}))
    for position, (name, step) in enumerate(steps.items()):
        if "stats" not in step:
            continue
        (workdir / name).mkdir()
        if step["produces"] in ("dataset", "model"):  # a complete output has its data/ or model/ dir
            (workdir / name / {"dataset": "data", "model": "model"}[step["produces"]]).mkdir()
        (workdir / name / "manifest.json").write_text(json.dumps({
            "step": name, "uses": step["uses"], "produces": step["produces"], "status": "complete",
            "key": f"{position:016x}", "parents": {p: "k" for p in step.get("parents", [])},
            "config": {"uses": step["uses"], **step.get("config", {})}, "stats": step["stats"],
            "seconds": 1.5 * position}))
    return workdir


LABEL_STATS = {"label_correct": 5, "label_incorrect": 9, "label_no_answer": 1, "label_truncated": 1,
               "label_bad_gold": 0, "label_timeout": 0, "label_error": 0}
DISTILL_RUN = {
    "problems": {"uses": "load", "produces": "dataset", "stats": {"rows": 4}, "config": {"path": "p.jsonl"}},
    "samples": {"uses": "sample", "produces": "dataset", "parents": ["problems"], "config": {"input": "problems"},
                "stats": {"rows": 16, "problems": 4, "finish_stop": 15, "finish_length": 1}},
    "graded": {"uses": "verify", "produces": "dataset", "parents": ["samples"], "config": {"input": "samples"},
               "stats": {"rows": 16, "problems": 4, "problems_solved": 3, **LABEL_STATS}},
    "kept": {"uses": "filter", "produces": "dataset", "parents": ["graded"], "config": {"input": "graded"},
             "stats": {"rows": 12, "rows_in": 16, "problems_in": 4, "problems_kept": 3, "removed_truncated": 0,
                       "removed_duplicate": 1, "removed_contaminated": 0}},
    "sft_data": {"uses": "select", "produces": "dataset", "parents": ["kept"], "config": {"input": "kept"},
                 "stats": {"rows": 2, "samples_in": 12, "problems_in": 3, "problems_kept": 2,
                           "dropped_too_long": 1}},
    "pairs": {"uses": "pairs", "produces": "dataset", "parents": ["kept"], "config": {"input": "kept"},
              "stats": {"rows": 2, "samples_in": 12, "problems_in": 3, "problems_paired": 2,
                        "problems_without_correct": 1, "problems_without_rejected": 0, "samples_too_long": 0}},
    "sft": {"uses": "sft", "produces": "model", "parents": ["sft_data"], "config": {"input": "sft_data"},
            "stats": {"rows": 2, "dropped_truncated": 0, "steps": 1, "train_seconds": 2.0}},
    "merged": {"uses": "merge", "produces": "model", "parents": ["sft"], "config": {"input": "sft"},
               "stats": {"merged": True}},
    # not run yet: its parents come from the recipe (its input and the step: model it names)
    "redi": {"uses": "redi", "config": {"input": "pairs", "model": "step:sft"}},
    "report": {"uses": "evaluate", "config": {"models": ["builtin:tiny-random", "step:merged", "step:redi"]}},
}


def test_funnel_from_hand_made_manifests(tmp_path):
    stages = funnel(read_steps(make_workdir(tmp_path / "run", DISTILL_RUN)))
    assert [(s.step, s.what, s.rows, s.problems, s.source) for s in stages] == [
        ("problems", "problems", 4, 4, None),
        ("samples", "samples", 16, 4, "problems"),
        ("graded", "graded samples", 16, 4, "samples"),
        ("kept", "rows kept", 12, 3, "graded"),
        ("sft_data", "selected traces", 2, 2, "kept"),
        ("pairs", "preference pairs", 2, 2, "kept"),
        ("sft", "rows trained on", 2, None, "sft_data"),
    ]  # merge has no rows; redi and report have not run
    by_step = {s.step: s for s in stages}
    assert {c.stat: c.count for c in by_step["samples"].breakdown} == {"finish_stop": 15, "finish_length": 1}
    # every graded label, ungraded ones only where they happened
    assert {c.stat: c.count for c in by_step["graded"].breakdown} == {
        "label_correct": 5, "label_incorrect": 9, "label_no_answer": 1, "label_truncated": 1, "problems_solved": 3}
    # what was dropped, and why; a reason that dropped nothing is not listed
    assert {c.stat: c.count for c in by_step["kept"].dropped} == {"removed_duplicate": 1}
    assert {c.stat: c.count for c in by_step["sft_data"].dropped} == {"problems_in - problems_kept": 1,
                                                                       "dropped_too_long": 1}
    assert {c.stat: c.count for c in by_step["pairs"].dropped} == {"problems_without_correct": 1}
    assert by_step["sft"].dropped == []


def test_steps_not_run_yet_read_what_their_recipe_entry_names(tmp_path):
    steps = {step.name: step for step in read_steps(make_workdir(tmp_path / "run", DISTILL_RUN))}
    assert (steps["redi"].state, steps["redi"].parents) == ("pending", ["pairs", "sft"])
    assert steps["report"].parents == ["merged", "redi"]
    assert steps["graded"].parents == ["samples"]  # from its manifest
    columns = {name: column for name, (column, _) in graph_layout(list(steps.values())).items()}
    assert columns == {"problems": 0, "samples": 1, "graded": 2, "kept": 3, "sft_data": 4, "pairs": 4, "sft": 5,
                       "merged": 6, "redi": 6, "report": 7}


def test_curves_leave_out_the_summary_counters_and_nan():
    history = [{"loss": 2.0, "grad_norm": float("nan"), "epoch": 0.5, "num_input_tokens_seen": 10,
                "train_runtime": 1.0, "step": 1},
               {"loss": 1.5, "redi/margin": 0.1, "learning_rate": 1e-4, "step": 2},
               {"train_loss": 1.75, "train_runtime": 2.0, "total_flos": 1.0, "step": 2}]
    assert logged_curves(history) == {"loss": [(1, 2.0), (2, 1.5)], "redi/margin": [(2, 0.1)],
                                      "learning_rate": [(2, 1e-4)]}


def test_what_is_not_a_run_is_refused_by_name(tmp_path):
    def report(path: Path):
        return subprocess.run([DISTILL, "report", str(path)], capture_output=True, text=True)

    done = report(tmp_path / "missing")
    assert done.returncode == 2 and f"{tmp_path / 'missing'}: no such directory" in done.stderr
    (tmp_path / "empty").mkdir()
    done = report(tmp_path / "empty")
    assert done.returncode == 2 and "not a Distillery workdir (no recipe.json)" in done.stderr
    make_workdir(tmp_path / "seeds" / "seed-0", {"problems": DISTILL_RUN["problems"]})
    done = report(tmp_path / "seeds")
    assert done.returncode == 2 and f"distill report {tmp_path / 'seeds' / 'seed-0'}" in done.stderr


def test_a_run_report_dir_it_did_not_write_is_never_replaced(tmp_path):
    workdir = make_workdir(tmp_path / "run", {"problems": DISTILL_RUN["problems"]})
    (workdir / REPORT_DIR).mkdir()
    (workdir / REPORT_DIR / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="was not written by `distill report`"):
        write_run_report(workdir)
    assert (workdir / REPORT_DIR / "notes.txt").read_text() == "mine"
    shutil.rmtree(workdir / REPORT_DIR)
    first = write_run_report(workdir)
    assert write_run_report(workdir) == first and first.is_file()  # its own report is replaced


def graded_workdir(path: Path) -> Path:
    """A finished verify step of 45 rows (3 problems x 15 samples, every third correct, one with a think span) and
    an evaluation of two arith_test problems, written as those steps write them."""
    import datasets

    from eval.benchmarks import load_benchmark
    from eval.run import sha256_files

    workdir = make_workdir(path, {
        "graded": {"uses": "verify", "produces": "dataset", "stats": {"rows": 45, "problems": 3, "label_correct": 15,
                                                                      "label_incorrect": 30}},
        "report": {"uses": "evaluate", "produces": "report", "stats": {"samples": 4}}})
    rows = [{"id": f"p{row // 15}", "sample_idx": row % 15, "model": "teacher", "prompt": [
        {"role": "user", "content": f"problem {row // 15}"}], "think_prefix": "<think>\n" if row == 3 else "",
        "completion": f"reasoning {row}</think>answer {row}" if row == 3 else f"answer {row}",
        "label": "correct" if row % 3 == 0 else "incorrect", "extracted": str(row), "answer": "0",
        "finish_reason": "stop"} for row in range(45)]
    datasets.Dataset.from_list(rows).save_to_disk(str(workdir / "graded" / "data"))
    benchmark, problems = load_benchmark("arith_test", 2)
    meta = {"n": {"arith_test": 1}, "models": {"student": {"completion_prefix": ""}},
            "benchmarks": {"arith_test": {"sha256": sha256_files([benchmark.path])}},
            "prompt_template": "Solve: {problem}"}
    (workdir / "report" / "results.json").write_text(json.dumps({"models": {}, "meta": meta}))
    (workdir / "report" / "report.md").write_text("# Evaluation report\n\n| model | pass@1 |\n|---|---|\n"
                                                  "| student <b>x</b> | 50.0 ± 50.0 |\n")
    samples = [{"benchmark": "arith_test", "id": p["id"], "model": "student", "sample_idx": 0, "answer": p["answer"],
                "completion": "42", "extracted": "42", "label": "incorrect", "finish_reason": "stop"}
               for p in problems]
    datasets.Dataset.from_list(samples).save_to_disk(str(workdir / "report" / "samples"))
    return workdir


def test_the_page_pages_through_chunks_and_opens_filtered_from_its_url(tmp_path):
    chromium()
    workdir = graded_workdir(tmp_path / "run")
    page = write_run_report(workdir, rows_per_chunk=10)
    assert sorted(p.name for p in (page.parent / "data").iterdir()) == [
        *(f"00-graded-{chunk:04d}.js" for chunk in range(5)), "00-graded-index.js",
        "01-report_arith_test-0000.js", "01-report_arith_test-index.js"]
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # nothing to fetch
    assert "student &lt;b&gt;x&lt;/b&gt;" in html  # report.md rendered, its text never markup

    elements = Elements(open_page(page, tmp_path / "profile", screenshot=tmp_path / "page.png"))
    assert len(samples_shown(elements)) == 20  # the first page of 45, unfiltered
    assert funnel_rows(elements)["graded"] == {"rows": 45, "problems": "3", "counts": {
        "label_correct": 15, "label_incorrect": 30, "label_no_answer": 0, "label_truncated": 0, "problems_solved": 0}}

    # the 15 correct rows (rows 0, 3, ..., 42) over chunks 0-4; page 1 shows 20 at most, so all 15
    elements = Elements(open_page(page, tmp_path / "profile", "browser=graded&label=correct"))
    shown = samples_shown(elements)
    assert [(s["data-id"], s["data-sample"]) for s in shown] == [(f"p{r // 15}", str(r % 15)) for r in range(0, 45, 3)]
    assert {s["data-label"] for s in shown} == {"correct"}
    assert elements.where(id="browser-status")[0]["data-matching"] == "15"
    think = [e for e in elements.found if e.get("class") == "think"]
    assert len(think) == 1  # row 3's reasoning is folded, its answer is not
    assert any(e["tag"] == "pre" and e["text"] == "answer 3" for e in elements.found)

    elements = Elements(open_page(page, tmp_path / "profile", "browser=graded&page=3"))
    shown = samples_shown(elements)
    assert [(s["data-id"], s["data-sample"]) for s in shown] == [("p2", str(i)) for i in range(10, 15)]
    # past the last page: the last page (p2 has 10 incorrect rows, one page)
    elements = Elements(open_page(page, tmp_path / "profile", "browser=graded&label=incorrect&problem=p2&page=2"))
    assert [s["data-sample"] for s in samples_shown(elements)] == [str(i) for i in range(15) if i % 3]

    elements = Elements(open_page(page, tmp_path / "profile", "browser=report/arith_test"))
    shown = samples_shown(elements)
    assert [s["data-model"] for s in shown] == ["student", "student"]
    assert any(e["tag"] == "pre" and e["text"].startswith("Solve: ") for e in elements.found)  # the prompt, again
