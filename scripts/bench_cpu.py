#!/usr/bin/env python3
"""Side-by-side CPU training throughput: gentrain vs PyTorch, on this machine, in one run.

For each of ``--repeats`` rounds this runs, one after the other (the order rotated every round so
that neither side always goes first):

    target/release/trainer bench --config CONFIG --threads T --steps S --json
    python scripts/torch_vae.py bench --config CONFIG --threads T --steps S --warmup W --json
    python scripts/torch_vae.py bench ... --compile            (unless --no-compile)

Each command prints a JSON object with ``samples_per_s`` (training samples per second, one
optimizer step per minibatch, dynamic binarization included). The report takes the median over
rounds per (framework, mode) and the ratio

    ratio = median samples/s of the row / median samples/s of PyTorch eager

and prints a markdown table; it writes ``bench/results/cpu-<UTC date>.json`` and ``.md`` with the
machine (lscpu model name, core count), torch version, the exact commands and every run.
The PyTorch side runs in the venv ``.venv-torch`` (see scripts/requirements-torch.txt) when it
exists, otherwise in the Python running this script.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def lscpu() -> dict:
    """lscpu's fields as a dict (empty if lscpu is unavailable)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = {}
    for line in out.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            fields[k.strip()] = v.strip()
    return fields


def machine_info() -> dict:
    cpu = lscpu()
    model = cpu.get("Model name")
    if not model:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "cpu_model": model or platform.processor() or "unknown",
        "cores": int(cpu.get("CPU(s)", os.cpu_count() or 0)),
        "threads_per_core": cpu.get("Thread(s) per core"),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "kernel": platform.release(),
        "hostname": platform.node(),
    }


def parse_json_output(text: str) -> dict:
    """The (last) JSON object with samples_per_s printed on stdout (whole or one per line)."""
    text = text.strip()
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            return obj
    except json.JSONDecodeError:
        pass
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "samples_per_s" in obj:
                return obj
    raise ValueError("no JSON object with samples_per_s in the output")


def run(cmd: list[str], timeout: float) -> tuple[dict | None, str | None]:
    """Runs one bench command; returns (record, None) or (None, error text)."""
    print(f"$ {shlex.join(cmd)}", flush=True)
    try:
        p = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f}s"
    try:
        rec = parse_json_output(p.stdout)
    except ValueError:
        rec = None
    if p.returncode != 0 or rec is None or "error" in rec or "samples_per_s" not in rec:
        err = (rec or {}).get("error") or (p.stderr.strip()[-1500:] or p.stdout.strip()[-1500:])
        return None, f"exit {p.returncode}: {err}"
    print(f"  -> {rec['samples_per_s']:.0f} samples/s", flush=True)
    return rec, None


def sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trainer", default="target/release/trainer",
                    help="gentrain binary, relative to the repo root (default %(default)s)")
    ap.add_argument("--config", default="configs/vae-examples.toml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30, help="PyTorch warm-up steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--python", default=None,
                    help="Python with torch (default .venv-torch/bin/python if present)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per command")
    ap.add_argument("--out-dir", default="bench/results")
    args = ap.parse_args()

    trainer = (REPO_ROOT / args.trainer) if not Path(args.trainer).is_absolute() else Path(
        args.trainer)
    if not (trainer.is_file() and os.access(trainer, os.X_OK)):
        sys.exit(f"error: gentrain binary {trainer} not found (or not executable).\n"
                 "Build it first:  cargo build --release   (then rerun this script)")
    config = REPO_ROOT / args.config if not Path(args.config).is_absolute() else Path(args.config)
    if not config.is_file():
        sys.exit(f"error: config {config} not found")
    venv_py = REPO_ROOT / ".venv-torch" / "bin" / "python"
    python = args.python or (str(venv_py) if venv_py.exists() else sys.executable)
    torch_vae = str(REPO_ROOT / "scripts" / "torch_vae.py")

    common = ["--config", str(config), "--threads", str(args.threads), "--steps", str(args.steps)]
    variants = {
        ("gentrain", "cpu"): [str(trainer), "bench", *common, "--json"],
        ("pytorch", "eager"): [python, torch_vae, "bench", *common, "--warmup",
                               str(args.warmup), "--json"],
    }
    if not args.no_compile:
        variants[("pytorch", "compile")] = variants[("pytorch", "eager")] + ["--compile"]
    keys = list(variants)

    runs: dict[tuple, list[dict]] = {k: [] for k in keys}
    errors: dict[tuple, list[str]] = {k: [] for k in keys}
    for r in range(args.repeats):
        print(f"--- round {r + 1}/{args.repeats}", flush=True)
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for key in order:
            rec, err = run(variants[key], args.timeout)
            if rec is not None:
                runs[key].append(rec)
            else:
                print(f"  FAILED: {err}", file=sys.stderr, flush=True)
                errors[key].append(err)
                if key[0] == "gentrain":
                    sys.exit(f"error: the gentrain bench command failed: {err}")

    base = runs[("pytorch", "eager")]
    base_med = statistics.median(x["samples_per_s"] for x in base) if base else None
    rows = []
    for key in keys:
        vals = [x["samples_per_s"] for x in runs[key]]
        if not vals:
            continue
        mode = key[1]
        if key[0] == "gentrain":
            mode = str(runs[key][0].get("mode", runs[key][0].get("backend", "cpu")))
        med = statistics.median(vals)
        rows.append({"framework": key[0], "mode": mode, "median_samples_per_s": med,
                     "ratio_vs_pytorch_eager": med / base_med if base_med else None,
                     "samples_per_s": vals, "batch": runs[key][0].get("batch"),
                     "threads": runs[key][0].get("threads"), "records": runs[key]})

    torch_version = next((x.get("torch_version") for x in base), None)
    machine = machine_info()
    now = dt.datetime.now(dt.timezone.utc)
    table = ["| framework | mode | samples/s (median) | ratio vs PyTorch eager | runs |",
             "| --- | --- | ---: | ---: | --- |"]
    for row in rows:
        ratio = (f"{row['ratio_vs_pytorch_eager']:.2f}x"
                 if row["ratio_vs_pytorch_eager"] is not None else "n/a")
        table.append(f"| {row['framework']} | {row['mode']} | "
                     f"{row['median_samples_per_s']:.0f} | {ratio} | "
                     + ", ".join(f"{v:.0f}" for v in row["samples_per_s"]) + " |")
    print()
    print("\n".join(table))

    failed = {f"{k[0]}/{k[1]}": v for k, v in errors.items() if v}
    result = {
        "date_utc": now.isoformat(timespec="seconds"),
        "machine": machine,
        "torch_version": torch_version,
        "python": python,
        "gentrain_commit": git_commit(),
        "config": str(config.relative_to(REPO_ROOT)) if config.is_relative_to(REPO_ROOT)
        else str(config),
        "config_sha256": sha256(config),
        "threads": args.threads, "steps": args.steps, "warmup_pytorch": args.warmup,
        "repeats": args.repeats,
        "commands": {f"{k[0]}/{k[1]}": shlex.join(v) for k, v in variants.items()},
        "results": rows,
        "errors": failed,
    }
    out_dir = REPO_ROOT / args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"cpu-{now.date().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    md = [f"# CPU training throughput, {now.date().isoformat()} (UTC)", "",
          f"- machine: {machine['cpu_model']}, {machine['cores']} cores"
          f" (threads per core: {machine['threads_per_core']}), kernel {machine['kernel']}",
          f"- torch {torch_version}, threads {args.threads}, {args.steps} timed steps"
          f" (PyTorch: {args.warmup} warm-up steps), median of {args.repeats} alternating rounds",
          f"- config `{result['config']}` (sha256 {str(result['config_sha256'])[:12]}),"
          f" gentrain commit {result['gentrain_commit'] or 'n/a'}",
          "", *table, "", "Commands:", ""]
    md += [f"- {name}: `{cmd}`" for name, cmd in result["commands"].items()]
    if failed:
        md += ["", "Failures:", ""]
        md += [f"- {name}: {errs[0][:300]}" for name, errs in failed.items()]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
