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

``--workloads`` picks what is timed (comma-separated, or ``all``; default ``vae``, the run
above). Each extra workload is gentrain against an independent PyTorch implementation of the same
model and recipe (scripts/torch_vae.py, torch_gan.py, torch_flow.py, diffusion_reference.py),
eager PyTorch only, in alternating rounds of one process per measurement:

    iwae1-k50, iwae2-k50     the IWAE Table 1 configs with k = 50 (1 and 2 stochastic layers)
    realnvp-mnist            configs/realnvp-mnist.toml
    sngan-grid25             configs/sngan-grid25.toml (MLP players, spectral norm)
    sngan-dcgan-mnist        configs/sngan-dcgan-mnist.toml
    wgan-gp-grid25           configs/gan-hinge-gp-grid25.toml with loss wgan_gp, n_critic 5,
                             penalty weight 10
    eval-k1000, eval-k5000   importance-sampled NLL of a one-epoch README VAE (trainer eval vs
                             torch_vae.py eval on the exported test rows); images per second
    ddpm-mnist               configs/ddpm-mnist.toml (S = --diffusion-steps, W =
                             --diffusion-warmup)

Training rates are the samples per second each side's ``bench`` reports (steps x batch / time;
a GAN step is one discriminator update, with a generator update every n_critic steps, on both
sides).

A selection other than the default adds a ``workloads`` list to the JSON (one entry per extra
workload with its commands, rows and errors) and a section per workload to the markdown, and
writes ``cpu-<date>-<names>.{json,md}`` so that it does not overwrite the default run's files.
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
import re
import subprocess
import sys
import tempfile
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
    if rec is not None and "samples_per_s" not in rec and rec.get("seconds") and rec.get("n"):
        rec["samples_per_s"] = rec["n"] / rec["seconds"]  # evaluation: images per second
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


# Extra workloads (``--workloads``), each timed gentrain vs PyTorch eager on the same config.
# kind "train": gentrain's `trainer bench` against the PyTorch script's training step (`bench`
# subcommand; `diffusion_reference.py --bench-train`), `steps` timed after `warmup`; `set`
# rewrites keys of the config for both sides (a derived copy in the run's temp directory).
# kind "eval": importance-sampled NLL with `k` samples on `limit` test images of a VAE checkpoint
# trained for one epoch at the start, `trainer eval` against `torch_vae.py eval` on the same
# exported test rows; the rate is images per second of the likelihood computation as each
# side reports it (`n / seconds`, both include the test ELBO from the same draws).
WORKLOADS = {
    "iwae1-k50": dict(title="IWAE 1 layer (784-200-200-50 tanh), k = 50, batch 20",
                      config="configs/iwae-table1/iwae-1layer-k50.toml", script="torch_vae.py",
                      steps=300, warmup=30),
    "iwae2-k50": dict(title="IWAE 2 layers (784-200-200-100-100-50 tanh), k = 50, batch 20",
                      config="configs/iwae-table1/iwae-2layer-k50.toml", script="torch_vae.py",
                      steps=200, warmup=20),
    "realnvp-mnist": dict(title="RealNVP on MNIST (configs/realnvp-mnist.toml)",
                          config="configs/realnvp-mnist.toml", script="torch_flow.py",
                          steps=40, warmup=5),
    "sngan-grid25": dict(title="MLP SN-GAN on the 25-Gaussian grid, batch 256",
                         config="configs/sngan-grid25.toml", script="torch_gan.py",
                         steps=300, warmup=30),
    "sngan-dcgan-mnist": dict(title="DCGAN SN-GAN on MNIST (configs/sngan-dcgan-mnist.toml)",
                              config="configs/sngan-dcgan-mnist.toml", script="torch_gan.py",
                              steps=40, warmup=5),
    "wgan-gp-grid25": dict(title="WGAN-GP (MLP, n_critic 5, penalty 10) on the 25-Gaussian grid",
                           config="configs/gan-hinge-gp-grid25.toml", script="torch_gan.py",
                           steps=300, warmup=30,
                           set={"loss": '"wgan_gp"', "n_critic": "5", "gp_weight": "10.0"}),
    "eval-k1000": dict(title="importance-sampled NLL, k = 1000, 500 test images (README VAE)",
                       kind="eval", k=1000, limit=500),
    "eval-k5000": dict(title="importance-sampled NLL, k = 5000, 100 test images (README VAE)",
                       kind="eval", k=5000, limit=100),
    "ddpm-mnist": dict(title="DDPM U-Net on MNIST (configs/ddpm-mnist.toml), batch 128",
                       config="configs/ddpm-mnist.toml", script="diffusion_reference.py",
                       steps=None, warmup=None),
}
DEFAULT_WORKLOADS = "vae"


def measure(variants: dict, repeats: int, timeout: float) -> tuple[dict, dict]:
    """Runs every variant once per round (order rotated); returns (runs, errors) per key."""
    keys = list(variants)
    runs: dict[tuple, list[dict]] = {k: [] for k in keys}
    errors: dict[tuple, list[str]] = {k: [] for k in keys}
    for r in range(repeats):
        print(f"--- round {r + 1}/{repeats}", flush=True)
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for key in order:
            rec, err = run(variants[key], timeout)
            if rec is not None:
                runs[key].append(rec)
            else:
                print(f"  FAILED: {err}", file=sys.stderr, flush=True)
                errors[key].append(err)
                if key[0] == "gentrain":
                    sys.exit(f"error: the gentrain bench command failed: {err}")
    return runs, errors


def summarize(keys: list, runs: dict) -> list[dict]:
    """One row per (framework, mode): median samples/s and the ratio to PyTorch eager."""
    base = runs.get(("pytorch", "eager"), [])
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
    return rows


def markdown_table(rows: list[dict], unit: str = "samples/s") -> list[str]:
    table = [f"| framework | mode | {unit} (median) | ratio vs PyTorch eager | runs |",
             "| --- | --- | ---: | ---: | --- |"]
    for row in rows:
        ratio = (f"{row['ratio_vs_pytorch_eager']:.2f}x"
                 if row["ratio_vs_pytorch_eager"] is not None else "n/a")
        # One decimal below 100 samples/s (the diffusion rows), none above (as before).
        fmt = (lambda v: f"{v:.1f}") if row["median_samples_per_s"] < 100 else (
            lambda v: f"{v:.0f}")
        table.append(f"| {row['framework']} | {row['mode']} | "
                     f"{fmt(row['median_samples_per_s'])} | {ratio} | "
                     + ", ".join(fmt(v) for v in row["samples_per_s"]) + " |")
    return table


def rel_config(config: Path) -> str:
    return str(config.relative_to(REPO_ROOT)) if config.is_relative_to(REPO_ROOT) else str(config)


def derived_config(base: Path, overrides: dict, out: Path) -> Path:
    """A copy of ``base`` with each ``key = value`` line of ``overrides`` replaced (each key
    must occur exactly once in the file)."""
    text = base.read_text()
    for key, value in overrides.items():
        pattern = re.compile(rf"^{re.escape(key)}\s*=.*$", re.M)
        if len(pattern.findall(text)) != 1:
            sys.exit(f"error: {base}: expected one line '{key} = ...' to override")
        text = pattern.sub(f"{key} = {value}", text)
    out.write_text(text)
    return out


def train_variants(name: str, spec: dict, trainer: Path, python: str, args, tmp: Path):
    """(config, steps, warmup, commands) of a training workload."""
    wcfg = REPO_ROOT / spec["config"]
    if not wcfg.is_file():
        sys.exit(f"error: config {wcfg} not found (workload {name})")
    if spec.get("set"):
        wcfg = derived_config(wcfg, spec["set"], tmp / f"{name}.toml")
    diffusion = spec["script"] == "diffusion_reference.py"
    st = str(args.diffusion_steps if diffusion else spec["steps"])
    wu = str(args.diffusion_warmup if diffusion else spec["warmup"])
    th = str(args.threads)
    script = str(REPO_ROOT / "scripts" / spec["script"])
    gentrain = [str(trainer), "bench", "--config", str(wcfg), "--threads", th, "--steps", st,
                "--warmup", wu, "--json"]
    if diffusion:
        torch = [python, script, "--bench-train", st, "--config", str(wcfg), "--threads", th,
                 "--warmup", wu, "--json"]
    else:
        torch = [python, script, "bench", "--config", str(wcfg), "--threads", th, "--steps", st,
                 "--warmup", wu, "--json"]
    return wcfg, int(st), int(wu), {("gentrain", "cpu"): gentrain, ("pytorch", "eager"): torch}


def eval_variants(spec: dict, trainer: Path, python: str, args, tmp: Path):
    """(config, steps, warmup, commands) of an evaluation workload: a one-epoch checkpoint of
    the README VAE and its exported test rows, made once per run of this script."""
    wcfg = REPO_ROOT / "configs" / "vae-examples.toml"
    ck, data = tmp / "vae-1-epoch", tmp / "test-binarized.idx"
    th = str(args.threads)
    if not ck.exists():
        for cmd in ([str(trainer), "train", "--config", str(wcfg), "--epochs", "1", "--out",
                     str(ck), "--threads", th, "--set", "eval.final_k=0", "--set",
                     "train.sample_every=0"],
                    [str(trainer), "export-data", "--checkpoint", str(ck), "--out", str(data)]):
            print(f"$ {shlex.join(cmd)}", flush=True)
            p = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"error: {shlex.join(cmd)} failed: {p.stderr.strip()[-500:]}")
    k, limit = str(spec["k"]), str(spec["limit"])
    gentrain = [str(trainer), "eval", "--checkpoint", str(ck), "--k", k, "--limit", limit,
                "--samples", "0", "--threads", th, "--json"]
    torch = [python, str(REPO_ROOT / "scripts" / "torch_vae.py"), "eval", "--checkpoint",
             str(ck), "--data", str(data), "--k", k, "--limit", limit, "--threads", th, "--json"]
    return wcfg, 0, 0, {("gentrain", "cpu"): gentrain, ("pytorch", "eager"): torch}


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
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                    help="comma-separated: vae (--config, the default) and/or "
                         + ", ".join(WORKLOADS) + ", or all (a gentrain training step of "
                         "the DDPM U-Net takes 0.5 s on 2 cores); default %(default)s")
    ap.add_argument("--diffusion-steps", type=int, default=20,
                    help="timed steps of the diffusion workloads, both sides (default %(default)s)")
    ap.add_argument("--diffusion-warmup", type=int, default=3,
                    help="warm-up steps of the diffusion workloads, both sides "
                         "(default %(default)s)")
    args = ap.parse_args()

    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if names == ["all"]:
        names = ["vae", *WORKLOADS]
    unknown = [w for w in names if w != "vae" and w not in WORKLOADS]
    if unknown or not names:
        sys.exit(f"error: unknown workload(s) {unknown or names}; known: vae, "
                 + ", ".join(WORKLOADS))
    trainer = (REPO_ROOT / args.trainer) if not Path(args.trainer).is_absolute() else Path(
        args.trainer)
    if not (trainer.is_file() and os.access(trainer, os.X_OK)):
        sys.exit(f"error: gentrain binary {trainer} not found (or not executable).\n"
                 "Build it first:  cargo build --release   (then rerun this script)")
    config = REPO_ROOT / args.config if not Path(args.config).is_absolute() else Path(args.config)
    if "vae" in names and not config.is_file():
        sys.exit(f"error: config {config} not found")
    venv_py = REPO_ROOT / ".venv-torch" / "bin" / "python"
    python = args.python or (str(venv_py) if venv_py.exists() else sys.executable)
    torch_vae = str(REPO_ROOT / "scripts" / "torch_vae.py")
    diffusion_ref = str(REPO_ROOT / "scripts" / "diffusion_reference.py")

    # The VAE workload (the script's original and default run: output unchanged).
    rows, variants, failed, torch_version = [], {}, {}, None
    if "vae" in names:
        common = ["--config", str(config), "--threads", str(args.threads), "--steps",
                  str(args.steps)]
        variants = {
            ("gentrain", "cpu"): [str(trainer), "bench", *common, "--json"],
            ("pytorch", "eager"): [python, torch_vae, "bench", *common, "--warmup",
                                   str(args.warmup), "--json"],
        }
        if not args.no_compile:
            variants[("pytorch", "compile")] = variants[("pytorch", "eager")] + ["--compile"]
        runs, errors = measure(variants, args.repeats, args.timeout)
        rows = summarize(list(variants), runs)
        torch_version = next((x.get("torch_version") for x in runs[("pytorch", "eager")]), None)
        failed = {f"{k[0]}/{k[1]}": v for k, v in errors.items() if v}

    # Extra workloads: gentrain against the PyTorch reference, each in its own rounds.
    extra = []
    tmp = Path(tempfile.mkdtemp(prefix="gentrain-bench-"))
    for name in names:
        if name == "vae":
            continue
        spec = WORKLOADS[name]
        print(f"=== workload {name}: {spec['title']}", flush=True)
        if spec.get("kind") == "eval":
            wcfg, st, wu, wvariants = eval_variants(spec, trainer, python, args, tmp)
        else:
            wcfg, st, wu, wvariants = train_variants(name, spec, trainer, python, args, tmp)
        wruns, werrors = measure(wvariants, args.repeats, args.timeout)
        torch_version = torch_version or next(
            (x.get("torch_version") for x in wruns[("pytorch", "eager")]), None)
        extra.append({
            "name": name, "title": spec["title"], "kind": spec.get("kind", "train"),
            "unit": "images/s" if spec.get("kind") == "eval" else "samples/s",
            "config": rel_config(wcfg), "config_sha256": sha256(wcfg),
            "overrides": spec.get("set"), "steps": st, "warmup": wu, "repeats": args.repeats,
            "commands": {f"{k[0]}/{k[1]}": shlex.join(v) for k, v in wvariants.items()},
            "results": summarize(list(wvariants), wruns),
            "errors": {f"{k[0]}/{k[1]}": v for k, v in werrors.items() if v},
        })

    machine = machine_info()
    now = dt.datetime.now(dt.timezone.utc)
    table = markdown_table(rows)
    if rows:
        print()
        print("\n".join(table))
    for w in extra:
        print(f"\n{w['title']} ({w['unit']})\n")
        print("\n".join(markdown_table(w["results"], w["unit"])))

    result = {
        "date_utc": now.isoformat(timespec="seconds"),
        "machine": machine,
        "torch_version": torch_version,
        "python": python,
        "gentrain_commit": git_commit(),
        "config": rel_config(config) if "vae" in names else None,
        "config_sha256": sha256(config) if "vae" in names else None,
        "threads": args.threads, "steps": args.steps, "warmup_pytorch": args.warmup,
        "repeats": args.repeats,
        "commands": {f"{k[0]}/{k[1]}": shlex.join(v) for k, v in variants.items()},
        "results": rows,
        "errors": failed,
    }
    if extra:
        result["workloads"] = extra
    out_dir = REPO_ROOT / args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    # The default run keeps its file name; other selections get theirs (no overwrite).
    suffix = "" if names == ["vae"] else "-" + "+".join(names)
    stem = out_dir / f"cpu-{now.date().isoformat()}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    md = [f"# CPU training throughput, {now.date().isoformat()} (UTC)", "",
          f"- machine: {machine['cpu_model']}, {machine['cores']} cores"
          f" (threads per core: {machine['threads_per_core']}), kernel {machine['kernel']}"]
    if "vae" in names:
        md += [f"- torch {torch_version}, threads {args.threads}, {args.steps} timed steps"
               f" (PyTorch: {args.warmup} warm-up steps), median of {args.repeats} alternating"
               " rounds",
               f"- config `{result['config']}` (sha256 {str(result['config_sha256'])[:12]}),"
               f" gentrain commit {result['gentrain_commit'] or 'n/a'}",
               "", *table, "", "Commands:", ""]
        md += [f"- {name}: `{cmd}`" for name, cmd in result["commands"].items()]
        if failed:
            md += ["", "Failures:", ""]
            md += [f"- {name}: {errs[0][:300]}" for name, errs in failed.items()]
    else:
        md += [f"- torch {torch_version}, threads {args.threads},"
               f" gentrain commit {result['gentrain_commit'] or 'n/a'}"]
    for w in extra:
        md += ["", f"## {w['title']}", "",
               (f"- {w['steps']} timed steps after {w['warmup']} warm-up steps on both sides,"
                if w["kind"] == "train" else "- rate: test images per second of the estimate,")
               + f" median of {w['repeats']} alternating rounds; config `{w['config']}`"
               f" (sha256 {str(w['config_sha256'])[:12]})"
               + (f", with {w['overrides']}" if w["overrides"] else ""),
               "", *markdown_table(w["results"], w["unit"]), "", "Commands:", ""]
        md += [f"- {name}: `{cmd}`" for name, cmd in w["commands"].items()]
        if w["errors"]:
            md += ["", "Failures:", ""]
            md += [f"- {name}: {errs[0][:300]}" for name, errs in w["errors"].items()]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
