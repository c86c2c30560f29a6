"""Screenshots of the expert-load dashboards as a user sees them: `dist-moe tensorboard` on a real run, opened
in a real headless browser (Debian's chromium: `apt-get install -y chromium`).

    python docs/tools/dashboards_screenshot.py [RUN_DIR] [--out docs/images]

Without RUN_DIR it first trains the tiny model (8 experts, 4 layers) for 30 steps on a slice of the stdlib
corpus, logging expert load every 10 steps, into a temporary run dir. Writes tensorboard_custom_scalars.png
and tensorboard_images.png; docs/expert_load.md shows the committed ones. Too slow for CI (about a minute for
chromium alone, the training run on top), so it is run by hand when the dashboards change.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

DEMO_RUN = ["data.max_corpus_mb=4", "data.tokenizer_sample_mb=2", "data.vocab_size=1024", "train.max_steps=30",
            "train.micro_batch_size=4", "train.eval_every=30", "log.expert_every=10"]
PAGES = ("custom_scalars", "images")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1400,1000", "--virtual-time-budget=20000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def wait_for_dashboards(base: str, server: subprocess.Popen, timeout_s: float = 180) -> None:
    """Until TensorBoard serves the custom-scalars layout and the heatmap images (it loads events lazily)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"dist-moe tensorboard exited with code {server.returncode}")
        try:
            layout = get_json(f"{base}/data/plugin/custom_scalars/layout")
            images = get_json(f"{base}/data/plugin/images/tags")
            if layout.get("category") and any(images.values()):
                return
        except OSError:
            pass
        time.sleep(1)
    sys.exit(f"TensorBoard at {base} showed no expert-load dashboards within {timeout_s:.0f} s")


def train_demo_run(run_dir: Path) -> None:
    cmd = [sys.executable, "-m", "dist_moe.cli", "train", "tiny", *DEMO_RUN, f"run_dir={run_dir}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def screenshot(chromium: str, url: str, path: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:  # a new empty profile: no state from earlier runs
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={path}", url],
                       check=True, capture_output=True, timeout=300)
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)  # a palette PNG: small to commit
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", help="a run dir with TensorBoard events (default: train a demo run)")
    parser.add_argument("--out", default="docs/images", help="folder for the PNGs")
    parser.add_argument("--chromium", default="chromium", help="the browser binary")
    args = parser.parse_args()
    chromium = shutil.which(args.chromium)
    if chromium is None:
        sys.exit(f"'{args.chromium}' not found: apt-get install -y chromium (or pass --chromium)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(args.run_dir) if args.run_dir else Path(scratch) / "demo"
        if not args.run_dir:
            train_demo_run(run_dir)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "dist_moe.cli", "tensorboard", str(run_dir),
                                   "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_dashboards(base, server)
            for page in PAGES:
                screenshot(chromium, f"{base}/#{page}", out / f"tensorboard_{page}.png")
        finally:
            server.terminate()  # TensorBoard itself: dist-moe tensorboard execs it
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
