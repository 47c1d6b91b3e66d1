"""`engine: ray` on `sample` and `evaluate`: refused at load without Ray; with it, on a Ray cluster on loopback that
the tests start and stop themselves, the same samples as the local engine, and a killed driver or replica resumes
with every problem's n samples exactly once."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.commands import cli

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# 1 GiB of KV cache per engine (vLLM's CPU default is 4): up to three engines share this machine at once. The test
# cluster listens on loopback only, so it goes without Ray's token authentication (which `ray status` and a
# joining driver would need the token file for).
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "RAY_AUTH_MODE": "disabled"}


def test_engine_ray_without_ray_fails_at_load_with_the_install_line(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))

    code = cli.main(["status", str(REPO / "recipes" / "smoke.yaml"), "-o", "steps.samples.engine=ray"])
    error = capsys.readouterr().err
    assert code == 2
    assert "steps.samples.engine" in error and 'pip install -e ".[ray]"' in error

    code = cli.main(["eval", "builtin:tiny-random", "--benchmarks", "gsm8k:8", "--engine", "ray"])
    error = capsys.readouterr().err
    assert code == 2
    assert "--engine" in error and 'pip install -e ".[ray]"' in error


def test_ray_settings_are_refused_with_the_local_engine(capsys):
    code = cli.main(["status", str(REPO / "recipes" / "smoke.yaml"), "-o", "steps.samples.replicas=2"])
    assert code == 2
    assert "steps.samples.replicas: Value error, only for engine: ray" in capsys.readouterr().err


def test_the_local_engine_never_imports_ray():
    check = ("import sys; from pipeline.core.recipe import load_recipe; "
             f"load_recipe({str(REPO / 'recipes' / 'smoke.yaml')!r}, []); "
             "import pipeline.steps.sample, pipeline.steps.evaluate, pipeline.engines.vllm_local, "
             "pipeline.commands.cli; "
             "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", check], check=True, cwd=REPO)


# ---- on a Ray cluster (slow: Ray and vLLM engines start in each) ----


def processes_mentioning(text: str) -> list[int]:
    """Pids of the processes whose command line holds `text` (our cluster's temp dir), this one excepted."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:  # exited meanwhile
                pass
    return pids


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def replica_workers(raylet_pids: list[int]) -> list[int]:
    """Pids of the Ray workers running an EngineReplica, children of our cluster's raylet."""
    workers = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                title = (entry / "cmdline").read_bytes().decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
            if parent in raylet_pids and "EngineReplica" in title:
                workers.append(int(entry.name))
    return workers


@pytest.fixture
def ray_cluster():
    """A one-node Ray cluster on 127.0.0.1 (2 CPUs, a small object store) in its own temp dir: its address.
    Stopped afterwards, also when the test fails: its process group, then anything still naming its temp dir."""
    pytest.importorskip("ray")
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "2", "--object-store-memory", str(300 * 2**20), "--temp-dir", temp_dir,
         "--include-dashboard", "false", "--disable-usage-stats"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, **ENGINE_ENV})
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while subprocess.run([str(BIN / "ray"), "status", "--address", address], capture_output=True).returncode:
            assert head.poll() is None, "ray start exited"
            assert time.time() < deadline, "the Ray cluster did not come up in 120 s"
            time.sleep(1)
        yield {"address": address, "temp_dir": temp_dir}
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the node's processes on SIGTERM
            head.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill_all(processes_mentioning(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


def distill(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "distill"), *args], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, **ENGINE_ENV, **(env or {})}, **kwargs)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def samples_of(step_dir: Path) -> list[dict]:
    import datasets

    return datasets.load_from_disk(str(step_dir / "data")).to_list()


@pytest.mark.slow  # a Ray cluster, the local engine and two replicas of SmolLM2: minutes on a 2-core machine
def test_smoke_samples_on_two_ray_replicas_equal_the_local_engines(tmp_path, ray_cluster):
    # 4 chunks of 6 problems, so both replicas have work
    common = ["--until", "samples", "-o", "steps.samples.chunk_size=6"]
    # SmolLM2's bfloat16 matmuls round differently with another number of torch threads (49 of these 96 samples
    # differ between 2 threads and 1): the local engine gets the one thread each replica has here (a CPU each).
    one_thread = {"OMP_NUM_THREADS": "1"}
    distill("run", "recipes/smoke.yaml", "-o", f"workdir={tmp_path / 'local'}", *common, env=one_thread)
    distill("run", "recipes/smoke.yaml", "-o", f"workdir={tmp_path / 'ray'}", *common,
            "-o", "steps.samples.engine=ray", "-o", "steps.samples.replicas=2",
            "-o", f"steps.samples.ray_address={ray_cluster['address']}")

    local, on_ray = samples_of(tmp_path / "local" / "samples"), samples_of(tmp_path / "ray" / "samples")
    assert len(local) == 24 * 4
    differing = [(a["id"], a["sample_idx"]) for a, b in zip(local, on_ray) if a["completion"] != b["completion"]]
    assert [(r["id"], r["sample_idx"]) for r in on_ray] == [(r["id"], r["sample_idx"]) for r in local]
    assert differing == []
    assert [r["completion_tokens"] for r in on_ray] == [r["completion_tokens"] for r in local]
    stats = json.loads((tmp_path / "ray" / "samples" / "manifest.json").read_text())["stats"]
    ray_stats = stats["ray"]
    assert ray_stats["replicas"] == 2 and len(ray_stats["nodes"]) == 1 and ray_stats["retries"] == 0
    assert sum(replica["chunks"] for replica in ray_stats["per_replica"].values()) == 4
    assert ray_stats["tokens_per_s"] > 0
    assert all(replica["tokens_per_s"] > 0 for replica in ray_stats["per_replica"].values())


@pytest.mark.slow  # starts its own Ray cluster and a tiny engine each way
def test_distill_eval_with_engine_ray_matches_the_local_engine(tmp_path):
    pytest.importorskip("ray")
    ray_tmp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")
    try:
        settings = ["builtin:tiny-random", "--benchmarks", "gsm8k:8", "--max-tokens", "16", "--chunk-size", "4"]
        distill("eval", *settings, "--out", str(tmp_path / "local"))
        # no --ray-address: the command starts a local cluster (in RAY_TMPDIR) and must stop it again
        distill("eval", *settings, "--engine", "ray", "--out", str(tmp_path / "ray"), env={"RAY_TMPDIR": ray_tmp})
        assert processes_mentioning(ray_tmp) == []
    finally:
        kill_all(processes_mentioning(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)

    import datasets

    local = datasets.load_from_disk(str(tmp_path / "local" / "samples")).to_list()
    on_ray = datasets.load_from_disk(str(tmp_path / "ray" / "samples")).to_list()
    assert len(local) == 8
    assert [(r["id"], r["completion"]) for r in on_ray] == [(r["id"], r["completion"]) for r in local]
    meta = json.loads((tmp_path / "ray" / "results.json").read_text())["meta"]
    assert meta["timings_s"]["builtin:tiny-random"]["ray"]["replicas"] == 1


@pytest.mark.slow  # three runs with engine starts, one of them killed
def test_killed_driver_and_killed_replica_resume_with_n_samples_per_problem_once(tmp_path, ray_cluster):
    """SIGKILL the driver (`distill run`, alone) mid-sampling, then resume and SIGKILL one replica mid-way: the
    run finishes with exactly n samples per problem, none twice, a retry counted, and the local engine's samples."""
    problems, n = 12, 3
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"What is {i} + {i + 7}?", "answer": str(2 * i + 7)})
                            + "\n" for i in range(problems)))
    recipe = tmp_path / "kill.yaml"
    recipe.write_text(
        "name: kill\nseed: 1\nsteps:\n"
        f"  problems: {{uses: load, path: {data}}}\n"
        f"  samples: {{uses: sample, input: problems, model: builtin:tiny-random, n: {n}, temperature: 1.0,"
        " max_tokens: 48, chunk_size: 2}\n")
    on_ray = ["-o", "steps.samples.engine=ray", "-o", "steps.samples.replicas=2",
              "-o", f"steps.samples.ray_address={ray_cluster['address']}"]
    workdir = tmp_path / "killed"
    shard_dir = workdir / ".samples.scratch" / "shards"

    def shards() -> int:
        return len(list(shard_dir.glob("chunk-*.json"))) if shard_dir.exists() else 0

    def wait_for_shards(proc, count: int) -> None:
        deadline = time.time() + 300
        while proc.poll() is None and shards() < count:
            assert time.time() < deadline, f"fewer than {count} shards after 300 s"
            time.sleep(0.05)

    command = [str(BIN / "distill"), "run", str(recipe), "-o", f"workdir={workdir}", *on_ray]
    env = {**os.environ, **ENGINE_ENV}
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_for_shards(driver, 1)
    assert driver.poll() is None, "the run finished before it could be killed"
    driver.send_signal(signal.SIGKILL)  # the driver alone: Ray ends the job's replicas
    driver.wait()
    killed_with = shards()
    assert 1 <= killed_with < 6
    raylets = [pid for pid in processes_mentioning(ray_cluster["temp_dir"])
               if b"raylet" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]]
    deadline = time.time() + 60
    while replica_workers(raylets):
        assert time.time() < deadline, "the killed driver's replicas still run after 60 s"
        time.sleep(0.5)

    resumed = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_shards(resumed, killed_with + 1)
    workers = replica_workers(raylets)
    assert resumed.poll() is None and workers, "the resumed run finished before a replica could be killed"
    os.kill(workers[0], signal.SIGKILL)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-4000:]

    samples = samples_of(workdir / "samples")
    pairs = [(row["id"], row["sample_idx"]) for row in samples]
    assert len(pairs) == len(set(pairs)) == problems * n
    assert sorted(pairs) == sorted((f"q{i}", k) for i in range(problems) for k in range(n))
    stats = json.loads((workdir / "samples" / "manifest.json").read_text())["stats"]
    assert stats["chunks_resumed"] == killed_with and stats["ray"]["retries"] >= 1
    # the chunks saved before the kill went to no replica; each other chunk came back once
    assert sum(replica["chunks"] for replica in stats["ray"]["per_replica"].values()) == 6 - killed_with

    distill("run", str(recipe), "-o", f"workdir={tmp_path / 'local'}")
    assert [row["completion"] for row in samples] == [row["completion"] for row in samples_of(tmp_path / "local" /
                                                                                                "samples")]
