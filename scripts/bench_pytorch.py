#!/usr/bin/env python3
"""Side-by-side GPU training throughput: gentrain vs PyTorch eager vs torch.compile, one GPU.

For every configuration ("case") below and each of ``--repeats`` rounds this runs, one after the
other (the order rotated every round so that no variant always goes first):

    target-cuda/release/trainer bench --config CONFIG --device cuda:0 --batch-size B
                                      --steps S --warmup W --json
    python scripts/torch_vae.py bench --config CONFIG --device cuda:0 --batch B
                                      --steps S --warmup W --mode eager --json
    python scripts/torch_vae.py bench ... --mode compile            (unless --no-compile)

``--variants`` picks some of the three (comma-separated: gentrain, eager, compile; default all
three, less what ``--no-compile`` / ``--no-gentrain`` remove): ``--variants compile`` measures
torch.compile alone, e.g. after a ``--no-compile`` run. A short check is ``--repeats 1 --steps 200
--warmup 20`` (scripts/gpu-first-contact.sh runs that, then ``--cases vae-b128 --variants compile``).

Cases (``--cases`` picks some by name, comma-separated):

    vae-b128          configs/vae-examples.toml (784-400-20, ELBO k=1) at batch 128
    vae-b1024         the same at batch 1024
    iwae1-k50-b20     configs/iwae-table1/iwae-1layer-k50.toml at its batch, 20
    iwae1-k50-b256    the same at batch 256
    iwae2-k5-b20      configs/iwae-table1/iwae-2layer-k5.toml (2 stochastic layers), batch 20
    iwae2-k5-b256     the same at batch 256

Each command prints a JSON object with ``samples_per_s`` (training samples per second, one
optimizer step per minibatch, dynamic binarization included; both sides warm up first and
synchronize the device around the timed loop only). Per case the report takes the median over
rounds per variant and the ratio

    ratio = median samples/s of the row / median samples/s of PyTorch eager (same case)

It writes ``<out-dir>/gpu-<UTC date>.json`` and ``.md`` (out dir ``bench/results`` by default;
on a lent GPU machine pass ``--out-dir $OUT``) with the GPU name and driver version (nvidia-smi),
the CUDA version (torch.version.cuda), torch version, the exact commands and every run. The
files are rewritten after each case, so a run cut short keeps the finished cases; several
partial runs are combined with ``--merge A.json B.json ...``.

Without the trainer binary (unless ``--no-gentrain``) or without CUDA in the PyTorch Python,
it exits with status 2 and one line on stderr. ``--dry-run`` prints the commands only.

gentrain's CUDA build loads the CUDA 13 libraries of PyTorch's pip packages (see
scripts/build-cuda.sh); their directory (``nvidia/cu13/lib``) is prepended to LD_LIBRARY_PATH for
all commands when it exists and is not there already (recorded under ``env``).

Common helpers (running a command, parsing its JSON, commit and file hashes, host info) come
from scripts/bench_cpu.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11 (the GPU machine's PyTorch Python may be older)
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        from pip._vendor import tomli as tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu  # noqa: E402  (shared helpers: run, sha256, git_commit, machine_info)

REPO_ROOT = bench_cpu.REPO_ROOT

# name -> (config, batch)
CASES = {
    "vae-b128": ("configs/vae-examples.toml", 128),
    "vae-b1024": ("configs/vae-examples.toml", 1024),
    "iwae1-k50-b20": ("configs/iwae-table1/iwae-1layer-k50.toml", 20),
    "iwae1-k50-b256": ("configs/iwae-table1/iwae-1layer-k50.toml", 256),
    "iwae2-k5-b20": ("configs/iwae-table1/iwae-2layer-k5.toml", 20),
    "iwae2-k5-b256": ("configs/iwae-table1/iwae-2layer-k5.toml", 256),
}

# What the PyTorch Python reports about itself (one JSON line).
PROBE = r"""
import json, os, sys
r = {"python": sys.version.split()[0]}
try:
    import torch
except Exception as e:
    r["error"] = f"cannot import torch: {type(e).__name__}: {e}"
    print(json.dumps(r)); sys.exit(0)
r.update(torch_version=torch.__version__, cuda_version=torch.version.cuda,
         cuda_available=torch.cuda.is_available())
if r["cuda_available"]:
    r["device_count"] = torch.cuda.device_count()
    r["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
try:
    import nvidia
    for base in list(nvidia.__path__):
        d = os.path.join(base, "cu13", "lib")
        if os.path.isdir(d):
            r["nvidia_lib_dir"] = d
            break
except Exception:
    pass
print(json.dumps(r))
"""


def die(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def probe_python(python: str) -> dict:
    try:
        p = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"cannot run {python}: {e}"}
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": f"{python} -c PROBE: exit {p.returncode}: "
                         f"{(p.stderr.strip() or p.stdout.strip())[-300:]}"}


def nvidia_smi(index: int) -> dict:
    """GPU name, driver version (nvidia-smi --query-gpu) and the driver's CUDA version."""
    info = {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=60, check=True).stdout.strip().splitlines()
        info["query_gpu"] = out
        if out:
            line = out[index] if index < len(out) else out[0]
            name, _, driver = (x.strip() for x in line.rpartition(","))
            info.update(name=name, driver_version=driver)
    except (OSError, subprocess.SubprocessError) as e:
        info["error"] = f"nvidia-smi: {e}"
        return info
    try:
        head = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
        m = re.search(r"CUDA Version:\s*([0-9.]+)", head)
        if m:
            info["driver_cuda_version"] = m.group(1)
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def read_config(path: Path) -> dict:
    with path.open("rb") as f:
        cfg = tomllib.load(f)
    return {"k": int(cfg.get("objective", {}).get("k", 1)),
            "objective": cfg.get("objective", {}).get("kind", "elbo"),
            "layers": len(cfg.get("model", {}).get("layers", [])) or 1,
            "config_batch": cfg.get("train", {}).get("batch_size")}


def abs_path(p: str) -> Path:
    return Path(p) if Path(p).is_absolute() else REPO_ROOT / p


def rel(p: Path) -> str:
    return str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p)


def case_commands(args, trainer: Path, python: str, config: Path, batch: int) -> dict:
    """(framework, mode) -> argv for one case."""
    steps = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    threads = ["--threads", str(args.threads)] if args.threads is not None else []
    variants = {}
    if "gentrain" in args.variants:
        variants[("gentrain", "cuda")] = [
            str(trainer), "bench", "--config", str(config), "--device", args.device,
            "--batch-size", str(batch), *steps, *threads,
            *(["--set", "train.tf32=false"] if args.no_tf32 else []), "--json"]
    eager = [python, str(REPO_ROOT / "scripts" / "torch_vae.py"), "bench", "--config",
             str(config), "--device", args.device, "--batch", str(batch), *steps, *threads,
             *(["--no-tf32"] if args.no_tf32 else []),
             *(["--fused-adam"] if args.fused_adam else [])]
    if "eager" in args.variants:
        variants[("pytorch", "eager")] = eager + ["--mode", "eager", "--json"]
    if "compile" in args.variants:
        variants[("pytorch", "compile")] = eager + [
            "--mode", "compile", *(["--compile-mode", args.compile_mode]
                                   if args.compile_mode else []), "--json"]
    return variants


def summarize(runs: dict, keys: list) -> list[dict]:
    """One row per variant: medians and the ratio to PyTorch eager."""
    base = runs.get(("pytorch", "eager")) or []
    base_med = statistics.median(x["samples_per_s"] for x in base) if base else None
    rows = []
    for key in keys:
        recs = runs[key]
        if not recs:
            continue
        vals = [x["samples_per_s"] for x in recs]
        med = statistics.median(vals)
        rows.append({"framework": key[0], "mode": str(recs[0].get("mode", key[1])),
                     "median_samples_per_s": med,
                     "ms_per_step_at_median": 1e3 * recs[0]["batch"] / med,
                     "ratio_vs_pytorch_eager": med / base_med if base_med else None,
                     "samples_per_s": vals, "batch": recs[0].get("batch"),
                     "k": recs[0].get("k"), "records": recs})
    return rows


def render_md(result: dict) -> str:
    gpu = result.get("gpu", {})
    date = result["date_utc"][:10]
    md = [f"# GPU training throughput, {date} (UTC)", "",
          f"- GPU: {gpu.get('name', 'n/a')}, driver {gpu.get('driver_version', 'n/a')} "
          f"(driver CUDA {gpu.get('driver_cuda_version', 'n/a')}), device {result['device']}",
          f"- torch {result.get('torch_version')}, CUDA {result.get('cuda_version')} "
          f"(torch.version.cuda), TF32 {'on' if result.get('tf32') else 'off'}",
          f"- {result['steps']} timed steps after {result['warmup']} warm-up steps, median of "
          f"{result['repeats']} alternating rounds; host {result['host'].get('cpu_model')}",
          f"- gentrain commit {result.get('gentrain_commit') or 'n/a'}, trainer "
          f"`{result.get('trainer')}` (sha256 {str(result.get('trainer_sha256'))[:12]})", "",
          "| case | config | batch | k | framework | mode | samples/s (median) "
          "| ms/step (at median) | ratio vs PyTorch eager | runs |",
          "| --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | --- |"]
    for case in result["cases"]:
        for row in case["results"]:
            ratio = (f"{row['ratio_vs_pytorch_eager']:.2f}x"
                     if row["ratio_vs_pytorch_eager"] is not None else "n/a")
            md.append(f"| {case['name']} | `{case['config']}` | {case['batch']} | {case['k']} "
                      f"| {row['framework']} | {row['mode']} | "
                      f"{row['median_samples_per_s']:.0f} | "
                      f"{1e3 * case['batch'] / row['median_samples_per_s']:.3f} | "
                      f"{ratio} | " + ", ".join(f"{v:.0f}" for v in row["samples_per_s"]) + " |")
    if result.get("merge_mismatch"):
        md += ["", "**Merged from runs with different settings:** "
               + "; ".join(result["merge_mismatch"])]
    if result.get("env"):
        md += ["", "Environment: " + ", ".join(f"`{k}={v}`" for k, v in result["env"].items())]
    md += ["", "Commands:", ""]
    for case in result["cases"]:
        md += [f"- {case['name']} {name}: `{cmd}`" for name, cmd in case["commands"].items()]
    failures = [(case["name"], name, errs) for case in result["cases"]
                for name, errs in case.get("errors", {}).items() if errs]
    if failures:
        md += ["", "Failures:", ""]
        md += [f"- {c} {name} ({len(errs)}x): {errs[0][:300]}" for c, name, errs in failures]
    return "\n".join(md) + "\n"


def write_outputs(result: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render_md(result))


def merge(files: list[str], out_dir: Path, name: str | None) -> None:
    """Combines the cases of several result files (metadata from the first) into one report."""
    results = [json.loads(Path(f).read_text()) for f in files]
    merged = dict(results[0])
    merged["cases"], seen = [], set()
    for r in results:
        for case in r["cases"]:
            if case["name"] in seen:  # a later file's case replaces an earlier one
                merged["cases"] = [c for c in merged["cases"] if c["name"] != case["name"]]
            seen.add(case["name"])
            merged["cases"].append(case)
    merged["merged_from"] = [str(f) for f in files]
    mismatch = []
    for key in ("device", "steps", "warmup", "repeats", "tf32", "compile_mode", "fused_adam",
                "torch_version", "cuda_version", "trainer_sha256"):
        vals = [r.get(key) for r in results]
        if any(v != vals[0] for v in vals):
            mismatch.append(f"{key}: " + ", ".join(map(str, vals)))
    names = [r.get("gpu", {}).get("name") for r in results]
    if any(v != names[0] for v in names):
        mismatch.append("gpu: " + ", ".join(map(str, names)))
    merged["merge_mismatch"] = mismatch
    stem = out_dir / (name or f"gpu-{merged['date_utc'][:10]}")
    write_outputs(merged, stem)
    print(render_md(merged))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Cases: " + ", ".join(CASES))
    ap.add_argument("--trainer", default="target-cuda/release/trainer",
                    help="gentrain CUDA binary, relative to the repo root (default %(default)s)")
    ap.add_argument("--device", default="cuda:0", help="cuda or cuda:N (default %(default)s)")
    ap.add_argument("--cases", default=",".join(CASES),
                    help="comma-separated case names (default: all)")
    ap.add_argument("--steps", type=int, default=500, help="timed steps (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=50,
                    help="untimed warm-up steps, both sides; includes torch.compile's "
                         "compilation (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for both sides (default: each side's own default)")
    ap.add_argument("--python", default=None,
                    help="Python with CUDA torch (default .venv-torch/bin/python if present, "
                         "else this Python)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--compile-mode", default=None,
                    choices=["default", "reduce-overhead", "max-autotune",
                             "max-autotune-no-cudagraphs"], help="torch.compile mode")
    ap.add_argument("--fused-adam", action="store_true", help="PyTorch: Adam(fused=True)")
    ap.add_argument("--no-tf32", action="store_true",
                    help="TF32 off on both sides (gentrain: --set train.tf32=false)")
    ap.add_argument("--no-gentrain", action="store_true", help="PyTorch variants only")
    ap.add_argument("--variants", default="gentrain,eager,compile",
                    help="comma-separated subset of gentrain, eager, compile to run "
                         "(default: all three, less --no-compile / --no-gentrain)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per command")
    ap.add_argument("--out-dir", default="bench/results",
                    help="where the .json/.md go (relative to the repo root unless absolute)")
    ap.add_argument("--name", default=None, help="file stem (default gpu-<UTC date>)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="combine earlier result files into one report and exit")
    args = ap.parse_args()

    out_dir = abs_path(args.out_dir)
    if args.merge:
        merge(args.merge, out_dir, args.name)
        return

    known = ("gentrain", "eager", "compile")
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in wanted if v not in known]
    if bad or not wanted:
        die(f"--variants: unknown {', '.join(bad) or '(none given)'}; known: {', '.join(known)}")
    args.variants = {v for v in wanted
                     if not (v == "compile" and args.no_compile)
                     and not (v == "gentrain" and args.no_gentrain)}
    if not args.variants:
        die("--variants: nothing left to run after --no-compile / --no-gentrain")
    args.no_gentrain = "gentrain" not in args.variants
    args.no_compile = "compile" not in args.variants

    m = re.fullmatch(r"cuda(?::(\d+))?", args.device)
    if not m:
        die(f"--device {args.device!r}: expected cuda or cuda:N")
    gpu_index = int(m.group(1) or 0)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown or not names:
        die(f"unknown case(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(CASES)}")

    trainer = abs_path(args.trainer)
    venv_py = REPO_ROOT / ".venv-torch" / "bin" / "python"
    python = args.python or (str(venv_py) if venv_py.exists() else sys.executable)
    cases = []
    for name in names:
        cfg_rel, batch = CASES[name]
        config = REPO_ROOT / cfg_rel
        if not config.is_file():
            die(f"config {config} not found")
        cases.append({"name": name, "config": cfg_rel, "batch": batch, **read_config(config),
                      "variants": case_commands(args, trainer, python, config, batch)})

    trainer_ok = trainer.is_file() and os.access(trainer, os.X_OK)
    if args.dry_run:
        if not args.no_gentrain and not trainer_ok:
            print(f"# note: {trainer} does not exist (yet); a real run would exit 2")
        print(f"# python: {python}; results would go to "
              f"{out_dir / (args.name or 'gpu-<UTC date>')}.json/.md")
        print(f"# {args.repeats} rounds per case, variant order rotated every round")
        for case in cases:
            print(f"# case {case['name']}: {case['config']} batch {case['batch']} "
                  f"k {case['k']} ({case['layers']} stochastic layer(s))")
            for cmd in case["variants"].values():
                print(shlex.join(cmd))
        return

    if not args.no_gentrain and not trainer_ok:
        die(f"gentrain binary {trainer} not found or not executable (build it with "
            "scripts/build-cuda.sh and carry it, pass --trainer PATH, or --no-gentrain)")
    probe = probe_python(python)
    if "error" in probe:
        die(f"PyTorch Python {python}: {probe['error']}")
    if not probe.get("cuda_available"):
        die(f"CUDA is not available to {python} (torch {probe.get('torch_version')}, CUDA build "
            f"{probe.get('cuda_version')}): this benchmark needs a GPU machine")
    if gpu_index >= probe.get("device_count", 0):
        die(f"--device {args.device}: only {probe.get('device_count')} CUDA device(s) visible")

    env = {}
    lib = probe.get("nvidia_lib_dir")
    ld = os.environ.get("LD_LIBRARY_PATH", "")
    if lib and lib not in ld.split(":"):
        os.environ["LD_LIBRARY_PATH"] = lib + (":" + ld if ld else "")
    if os.environ.get("LD_LIBRARY_PATH"):
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]

    now = dt.datetime.now(dt.timezone.utc)
    stem = out_dir / (args.name or f"gpu-{now.date().isoformat()}")
    result = {
        "date_utc": now.isoformat(timespec="seconds"),
        "gpu": nvidia_smi(gpu_index),
        "device": args.device,
        "torch_devices": probe.get("devices"),
        "torch_version": probe.get("torch_version"),
        "cuda_version": probe.get("cuda_version"),
        "python": python, "python_version": probe.get("python"),
        "host": bench_cpu.machine_info(),
        "gentrain_commit": bench_cpu.git_commit(),
        "trainer": None if args.no_gentrain else rel(trainer),
        "trainer_sha256": None if args.no_gentrain else bench_cpu.sha256(trainer),
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "threads": args.threads, "tf32": not args.no_tf32, "compile_mode": args.compile_mode,
        "fused_adam": args.fused_adam, "env": env,
        "variants": [v for v in ("gentrain", "eager", "compile") if v in args.variants],
        "cases": [],
    }
    gpu = result["gpu"]
    print(f"GPU {gpu.get('name', '?')} (driver {gpu.get('driver_version', '?')}), torch "
          f"{result['torch_version']}, CUDA {result['cuda_version']}", flush=True)

    for ci, case in enumerate(cases):
        variants = case.pop("variants")
        keys = list(variants)
        runs = {k: [] for k in keys}
        errors = {k: [] for k in keys}
        print(f"=== case {case['name']}: {case['config']} batch {case['batch']} k {case['k']}",
              flush=True)
        for r in range(args.repeats):
            print(f"--- round {r + 1}/{args.repeats}", flush=True)
            order = keys[r % len(keys):] + keys[:r % len(keys)]
            for key in order:
                rec, err = bench_cpu.run(variants[key], args.timeout)
                if rec is not None:
                    runs[key].append(rec)
                    continue
                print(f"  FAILED: {err}", file=sys.stderr, flush=True)
                errors[key].append(err)
                # A setup problem shows in the very first attempt: stop instead of burning
                # GPU time on the remaining runs (torch.compile failing alone is recorded).
                if ci == 0 and r == 0 and key != ("pytorch", "compile"):
                    case.update(commands={f"{k[0]}/{k[1]}": shlex.join(v)
                                          for k, v in variants.items()},
                                results=summarize(runs, keys),
                                errors={f"{k[0]}/{k[1]}": v for k, v in errors.items() if v})
                    result["cases"].append(case)
                    write_outputs(result, stem)
                    lines = [x.strip() for x in (err or "").splitlines() if x.strip()]
                    brief = " ... ".join(dict.fromkeys(lines[:1] + lines[-1:]))
                    die(f"the first {key[0]}/{key[1]} run failed, stopping (see "
                        f"{stem.with_suffix('.json')}): {brief}"[:600], code=1)
        case.update(commands={f"{k[0]}/{k[1]}": shlex.join(v) for k, v in variants.items()},
                    results=summarize(runs, keys),
                    errors={f"{k[0]}/{k[1]}": v for k, v in errors.items() if v})
        result["cases"].append(case)
        write_outputs(result, stem)  # after every case: a run cut short keeps what finished

    md = render_md(result)
    print()
    print(md)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
