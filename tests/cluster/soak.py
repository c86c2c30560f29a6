"""Chaos soak (by hand, not in CI; about 20 minutes plus the reference run; root and `ip netns` needed):
a `dist-moe submit` run with cluster.min_workers=1 on the three-node namespace cluster (netns_cluster.py)
while a random worker node is killed every 2-4 minutes and started again 1-2 minutes later; once, the job is
stopped with `dist-moe stop` and submitted again (it resumes from the step it saved). Then an undisturbed run
of the same steps on the same cluster gives the reference val loss. Prints the table docs/resuming.md keeps:
    sudo nice -n 10 .venv/bin/python tests/cluster/soak.py --minutes 20 --out soak.json
Per kill: the step logged and the newest checkpoint at the kill, the step the next worker group resumed from
(events.jsonl), the steps lost beyond the last checkpoint (checkpoint at the kill - resumed step, target 0),
and the wall time from the kill to the next worker group's start (wall time lost: that, plus retraining the
steps since the checkpoint). Over the run: steps of
1..max_steps missing from or repeated in metrics.jsonl (target 0), and the final val losses.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from netns_cluster import NetnsCluster, netns_unavailable  # noqa: E402

from dist_moe.train import events  # noqa: E402

RUN = ["data.max_corpus_mb=2", "data.tokenizer_sample_mb=1", "data.vocab_size=512", "data.seq_len=64",
       "model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=128",
       "moe.num_experts=4", "moe.d_expert=128", "train.micro_batch_size=8", "log.every=1", "cluster.num_workers=2",
       "moe.ep_size=2", "train.lr=1e-3", "ckpt.every=10", "train.eval_every=100", "cluster.min_workers=1",
       "cluster.max_failures=100", "cluster.resize_check_s=5", "cluster.stop_timeout_s=120"]


class Soak:
    def __init__(self, cluster: NetnsCluster, work: Path, steps: int):
        self.cluster, self.work, self.steps = cluster, work, steps
        self.run_dir = work / "soak"
        self.cwd = work / "cwd"  # what a submit uploads as the job's working dir: empty, not the run dirs
        self.cwd.mkdir(exist_ok=True)
        self.kills: list[dict] = []
        self.stops: list[dict] = []

    def dist_moe(self, *args: str, timeout: int = 600) -> str:
        result = self.cluster.exec([sys.executable, "-m", "dist_moe.cli", *args], capture_output=True, text=True,
                                   timeout=timeout, cwd=self.cwd)
        return result.stdout + result.stderr

    def submit(self, run_dir: Path, wait: bool = False) -> str:
        out = self.dist_moe("submit", "--address", self.cluster.address, *([] if wait else ["--no-wait"]), *RUN,
                            f"train.max_steps={self.steps}", f"run_dir={run_dir}",
                            f"data.cache_dir={self.work / 'cache'}", timeout=7200)
        found = re.search(r"submitted job (\S+)", out)
        if not found:
            raise RuntimeError(f"submit failed:\n{out[-3000:]}")
        return found.group(1)

    def job_state(self, job_id: str) -> str:
        out = self.dist_moe("status", "--address", self.cluster.address, job_id)
        return next((s for s in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING") if s in out), "?")

    def last_step(self) -> int:
        return max(logged_steps(self.run_dir), default=0)

    def newest_checkpoint(self) -> int:
        steps = [int(p.name.split("_")[1]) for p in (self.run_dir / "checkpoints").glob("step_*") if "." not in p.name]
        return max(steps, default=0)

    def sleep_watching(self, seconds: float, job_id: str) -> bool:
        """Sleep, returning early (False) once the job has ended."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.job_state(job_id) in ("SUCCEEDED", "FAILED", "STOPPED"):
                return False
            time.sleep(5)
        return True

    def kill_and_restart(self, job_id: str) -> bool:
        node = random.choice(range(1, len(self.cluster.names)))
        kill = {"node": node, "time": time.time(), "step": self.last_step(), "checkpoint": self.newest_checkpoint()}
        self.cluster.kill_node(node)
        self.kills.append(kill)
        print(f"killed node {node} at step {kill['step']} (checkpoint {kill['checkpoint']})", flush=True)
        alive = self.sleep_watching(random.uniform(60, 120), job_id)
        self.cluster.restart_node(node)
        print(f"node {node} back", flush=True)
        return alive

    def stop_and_resume(self, job_id: str) -> str:
        step = self.last_step()
        self.dist_moe("stop", "--address", self.cluster.address, job_id)
        self.cluster.wait_for(lambda: self.job_state(job_id) != "RUNNING", 300, "the job to stop")
        saved = self.newest_checkpoint()
        self.stops.append({"step": step, "saved": saved, "state": self.job_state(job_id)})
        print(f"stopped at step {step}, saved {saved}; resubmitting", flush=True)
        return self.submit(self.run_dir)

    def run(self, minutes: float) -> str:
        job_id = self.submit(self.run_dir)
        end = time.monotonic() + minutes * 60
        stopped_once = False
        while time.monotonic() < end:
            if not self.sleep_watching(random.uniform(120, 240), job_id) or not self.kill_and_restart(job_id):
                break
            if not stopped_once and time.monotonic() > end - minutes * 30:  # once, past the middle
                job_id, stopped_once = self.stop_and_resume(job_id), True
        while self.sleep_watching(30, job_id):
            pass
        return self.job_state(job_id)


def logged_steps(run_dir: Path) -> list[int]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [row["step"] for row in map(json.loads, lines) if "train/loss" in row]


def final_val(run_dir: Path) -> float | None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next((row["val/loss"] for row in reversed(rows) if "val/loss" in row), None)


def report(soak: Soak, state: str, reference: Path | None) -> dict:
    """Match each kill to the next worker-group start in events.jsonl; count missing and repeated steps."""
    starts = [e for e in events.read(soak.run_dir) if e["event"] == "start"]
    for kill in soak.kills:
        after = [e for e in starts if e["time"] > kill["time"]]
        kill["resumed"] = after[0]["from_step"] if after else None
        kill["lost_beyond_checkpoint"] = kill["checkpoint"] - kill["resumed"] if after else None
        kill["retrained"] = kill["step"] - kill["resumed"] if after else None
        kill["restarted_after_s"] = after[0]["time"] - kill["time"] if after else None
    counts = Counter(logged_steps(soak.run_dir))
    return {"state": state, "steps": soak.steps, "kills": soak.kills, "stops": soak.stops,
            "missing": [s for s in range(1, soak.steps + 1) if s not in counts],
            "repeated": sorted(s for s, n in counts.items() if n > 1),
            "val_loss": final_val(soak.run_dir), "reference_val_loss": final_val(reference) if reference else None}


def table(result: dict) -> str:
    rows = ["| kill | node | step at kill | checkpoint | resumed from | lost beyond checkpoint | retrained | "
            "restarted after |", "|---|---|---|---|---|---|---|---|"]
    for i, k in enumerate(result["kills"], 1):
        restarted = f"{k['restarted_after_s']:.0f} s" if k["restarted_after_s"] is not None else "-"
        rows.append(f"| {i} | {k['node']} | {k['step']} | {k['checkpoint']} | {k['resumed']} | "
                    f"{k['lost_beyond_checkpoint']} | {k['retrained']} | {restarted} |")
    rows.append(f"\njob {result['state']}; {len(result['kills'])} kills, stops {result['stops']}; steps missing "
                f"{result['missing'] or 0}, repeated {result['repeated'] or 0}; final val loss {result['val_loss']} "
                f"(undisturbed run: {result['reference_val_loss']})")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20, help="how long the kill loop runs")
    parser.add_argument("--steps", type=int, default=3000, help="train.max_steps of both runs")
    parser.add_argument("--no-reference", action="store_true", help="skip the undisturbed run")
    parser.add_argument("--out", default="soak.json", help="the results as JSON")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    reason = netns_unavailable()
    if reason:
        sys.exit(f"netns cluster: {reason}")
    random.seed(args.seed)
    cluster = NetnsCluster(num_nodes=3, cpus_per_node=1).start()
    try:
        soak = Soak(cluster, Path(tempfile.mkdtemp(prefix="dmsoak", dir="/tmp")), args.steps)  # kept afterwards
        state = soak.run(args.minutes)
        reference = None
        if not args.no_reference:
            reference = soak.work / "reference"
            soak.submit(reference, wait=True)
        result = report(soak, state, reference)
    finally:
        cluster.close()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"run dirs in {soak.work}")


if __name__ == "__main__":
    main()
