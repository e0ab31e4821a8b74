"""Record what short CPU training runs produce, to the bit, and check that a later commit reproduces it.

    export METALEARN_DATA=... METALEARN_CACHE=...
    .venv/bin/python benchmarks/behaviour_record.py record --out benchmarks/results/behaviour_cpu.json
    .venv/bin/python benchmarks/behaviour_record.py compare --against benchmarks/results/behaviour_cpu.json
    .venv/bin/python benchmarks/behaviour_record.py record --only maml,anil --steps 2 --episodes 5 --out /tmp/b.json

Why: a refactor of the engine (issue #14) must leave behaviour unchanged, to the bit. Before it,
`record` trains every algorithm in every execution mode it accepts and stores what came out; after
it, `compare` trains the same runs again and says, per run, whether the result is identical.

The runs (one process, threads=1, seed 0, in a temporary folder; nothing is written under runs/):
  - the quick Omniglot preset (omniglot_5w1s_quick) shrunk to 20 outer steps, conv4 with 16 filters (--hidden),
    meta-batch 4 and 50 fixed test episodes, for maml, fomaml, anil, boil, metasgd, mamlpp, reptile
    and protonet. mamlpp runs as MAML++ is meant to (conv4_perstep, 2 inner steps with per-step
    BatchNorm, learned per-step lrs, multi-step loss, derivative-order and cosine annealing);
    protonet keeps the preset's ways;
  - one outer step of MAML sinusoid regression (maml_sinusoid) with 50 test episodes;
  each under outer.execution = loop, batched, hybrid and auto. A mode that metalearn refuses for an
  algorithm (a MetalearnError before training) is recorded as skipped, with the reason; the loop, the
  reference every algorithm has, is never skipped (a refusal there, e.g. no data set, is an error). reptile and
  protonet ignore outer.execution today (each runs its own loop); their four runs are kept anyway,
  so a change there shows too. `plan` is the execution path a run actually took (auto's choice on a
  CPU: hybrid for conv4 where available, else the loop; batched for the sinusoid MLP).

Recorded per run: the sha256 of the final checkpoint's model state_dict (tensors in sorted name order:
name, dtype, shape and raw bytes) and of each tensor, the algorithm's state (learned lrs, Meta-SGD's
alpha, Reptile's Adam state: small tensors as exact values, all hashed), the 50 per-episode test
scores (accuracies; MSEs for sinusoid) as exact floats and their mean. Bits hold for the same torch
build and CPU kind (`torch`, `cpu_capability` in the file): on another machine compare may differ
without any code change.

`compare` reruns the runs the file lists, with the overrides stored in it (so it also checks a file
recorded with --steps/--episodes), and exits 1 when any run differs or fails. `--only` limits either
mode to some algorithms (`sinusoid` names the sinusoid run) or single runs (`maml/hybrid`);
`--rename OLD=NEW` reruns with a config key that moved (`--rename outer.msl_iterations=mamlpp.msl_iterations`).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from metalearn.errors import MetalearnError

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ["maml", "fomaml", "anil", "boil", "metasgd", "mamlpp", "reptile", "protonet"]
MODES = ["loop", "batched", "hybrid", "auto"]
QUICK, SINUSOID = "omniglot_5w1s_quick", "maml_sinusoid"
SMALL_TENSOR = 8
"""Algorithm-state tensors up to this many entries are stored as values too (mamlpp's per-step lrs)."""

# extra overrides per algorithm on top of the quick preset (MAML++ with its own model and schedules)
EXTRA = {"mamlpp": ["model.name=conv4_perstep", "model.bn_steps=2", "inner.steps=2", "eval.inner_steps=2",
                    "mamlpp.msl_iterations=10", "mamlpp.first_order_until=5", "mamlpp.final_lr=0.0001"]}


class Failure(Exception):
    """A one-line error for the command line."""


# --- the runs -------------------------------------------------------------------------------------
def planned_runs(steps: int, episodes: int, only: Optional[List[str]], hidden: int = 16) -> List[Dict[str, Any]]:
    """[{id, preset, overrides}] of every run, in a fixed order."""
    runs = []
    for algo in ALGORITHMS + ["sinusoid"]:
        for mode in MODES:
            if not selected(f"{algo}/{mode}", only):
                continue
            common = ["seed=0", "threads=1", "device=cpu", f"outer.execution={mode}", f"eval.episodes={episodes}"]
            if algo == "sinusoid":  # one outer step of MAML sinusoid regression
                runs.append({"id": f"sinusoid/{mode}", "preset": SINUSOID,
                             "overrides": common + ["outer.iterations=1"]})
                continue
            runs.append({"id": f"{algo}/{mode}", "preset": QUICK,
                         "overrides": common + [f"outer.algorithm={algo}", f"outer.iterations={steps}",
                                                f"model.hidden={hidden}", "outer.meta_batch_size=4",
                                                *EXTRA.get(algo, [])]})
    return runs


def sha256_tensors(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in sorted name order: name, dtype, shape, raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(tensor_bytes(name, tensors[name]))
    return h.hexdigest()


def tensor_bytes(name: str, t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    head = f"{name}|{t.dtype}|{tuple(t.shape)}|".encode()
    return head + t.view(torch.uint8).numpy().tobytes() if t.numel() else head


def flatten_state(state: Any, prefix: str = "") -> Dict[str, Any]:
    """Nested dicts/lists of an algorithm's state as {dotted name: tensor or plain value}."""
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return {prefix.rstrip("."): state}
    out: Dict[str, Any] = {}
    for k, v in items:
        out.update(flatten_state(v, f"{prefix}{k}."))
    return out


def describe_state(state: Any) -> Dict[str, Any]:
    """The algorithm's state: its sha256 and, per entry, exact values (small tensors, numbers) or a hash."""
    flat = flatten_state(state or {})
    entries: Dict[str, Any] = {}
    h = hashlib.sha256()
    for name in sorted(flat):
        v = flat[name]
        if isinstance(v, torch.Tensor):
            b = tensor_bytes(name, v)
            entries[name] = (v.detach().cpu().double().flatten().tolist() if v.numel() <= SMALL_TENSOR
                             else hashlib.sha256(b).hexdigest())
        else:
            b = f"{name}|{v!r}".encode()
            entries[name] = v
        h.update(b)
    return {"sha256": h.hexdigest(), "entries": entries}


def run_one(run: Dict[str, Any], out_dir: Path) -> Dict[str, Any]:
    """Train `run` in `out_dir`: its record; {"status": "skipped", "reason"} when metalearn refuses the setup,
    {"status": "failed", "reason"} when it stops with an error while training."""
    from metalearn.checkpoint import load_checkpoint
    from metalearn.config import load_config
    from metalearn.train import train

    name = run["id"].replace("/", "-")
    overrides = run["overrides"] + [f"tracking.out_dir={out_dir}", f"tracking.name={name}",
                                    "tracking.progress=false", "checkpoint.every=0"]
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        cfg = load_config(run["preset"], overrides)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            summary = train(cfg)
    except MetalearnError as e:  # refused before training (no run folder yet), or failed while training
        return {"status": "failed" if (out_dir / name).exists() else "skipped", "reason": str(e)}
    seconds = time.perf_counter() - t0
    ev = summary.get("eval") or {}
    if "accuracies" not in ev:
        raise Failure(f"{run['id']}: the training summary holds no per-episode scores (summary['eval']['accuracies'])")
    ckpt = load_checkpoint(Path(summary["run_dir"]))
    model = ckpt["model"]
    return {"status": "ran", "preset": run["preset"], "overrides": run["overrides"], "plan": ev.get("execution"),
            "step": ckpt["step"], "params_sha256": sha256_tensors(model),
            "tensors": {n: hashlib.sha256(tensor_bytes(n, t)).hexdigest() for n, t in sorted(model.items())},
            "algorithm_state": describe_state(ckpt.get("algorithm")),
            "metric": ev.get("metric", "accuracy"), "episodes": ev["accuracies"], "mean": ev.get("mean"),
            "seconds": round(seconds, 1)}


def run_all(runs: List[Dict[str, Any]], strict: bool = False) -> Dict[str, Dict[str, Any]]:
    """{run id: record} of `runs`; strict (record): a failed run, or a refused loop run, is an error."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="behaviour_record-") as tmp:
        for run in runs:
            res = run_one(run, Path(tmp))
            if strict and (res["status"] == "failed" or (res["status"] == "skipped" and run["id"].endswith("/loop"))):
                raise Failure(f"{run['id']}: {res['reason']}")
            res.setdefault("preset", run["preset"])
            res.setdefault("overrides", run["overrides"])
            what = (f"{res['plan']}, {res['seconds']:.1f} s, mean {res['mean']!r}" if res["status"] == "ran"
                    else f"{res['status']}: {res['reason']}")
            print(f"{run['id']:<18} {what}", flush=True)
            results[run["id"]] = res
    return results


def auto_notes(runs: Dict[str, Dict[str, Any]]) -> List[str]:
    """Whether each `auto` run equals the run of the mode auto chose (it should, to the bit)."""
    notes = []
    for rid, r in runs.items():
        twin = runs.get(f"{rid.split('/')[0]}/{r.get('plan')}")
        if rid.endswith("/auto") and r["status"] == "ran" and twin is not None and twin is not r:
            same = not differences({**twin, "plan": r["plan"]}, r)
            notes.append(f"{rid} chose {r['plan']}: {'identical to' if same else 'DIFFERS from'} "
                         f"{rid.split('/')[0]}/{r['plan']}")
    return notes


# --- provenance -----------------------------------------------------------------------------------
def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Where the numbers come from; `uncommitted` = tracked files changed since `commit` (git status);
    `command` = this script with the arguments main() was given (sys.argv's when run as a script)."""
    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--untracked-files=no").splitlines(),
            "command": shlex.join([Path(sys.executable).name, "benchmarks/behaviour_record.py",
                                   *(sys.argv[1:] if argv is None else argv)]),
            "torch": torch.__version__, "threads": 1, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "python": platform.python_version(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}


# --- compare --------------------------------------------------------------------------------------
def differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """What differs between two records of one run (empty: identical)."""
    if old["status"] != new["status"]:
        return [f"was {old['status']}, now {new['status']}" + (f" ({new['reason']})" if new.get("reason") else "")]
    if old["status"] == "skipped":
        return []
    out = []
    if old["params_sha256"] != new["params_sha256"]:
        names = sorted(set(old["tensors"]) | set(new["tensors"]))
        changed = [n for n in names if old["tensors"].get(n) != new["tensors"].get(n)]
        out.append(f"parameters ({len(changed)} of {len(names)} tensors: {', '.join(changed[:6])}"
                   f"{', ...' if len(changed) > 6 else ''})")
    if old["algorithm_state"]["sha256"] != new["algorithm_state"]["sha256"]:
        a, b = old["algorithm_state"]["entries"], new["algorithm_state"]["entries"]
        changed = [n for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
        out.append(f"algorithm state ({', '.join(changed[:6]) or 'encoding'})")
    if old["step"] != new["step"]:
        out.append(f"step {old['step']} -> {new['step']}")
    e0, e1 = old["episodes"], new["episodes"]
    if len(e0) != len(e1):
        out.append(f"{len(e0)} episodes recorded, {len(e1)} now")
    else:
        bad = [i for i, (x, y) in enumerate(zip(e0, e1)) if x != y]
        if bad:
            out.append(f"{old['metric']} of {len(bad)} of {len(e0)} episodes (episode {', '.join(map(str, bad[:8]))}"
                       f"{', ...' if len(bad) > 8 else ''})")
    if old["mean"] != new["mean"]:
        out.append(f"mean {old['mean']!r} -> {new['mean']!r}")
    if new.get("plan") is not None and old.get("plan") != new.get("plan"):
        out.append(f"execution path {old.get('plan')} -> {new['plan']}")
    return out


def renamed(overrides: List[str], renames: Dict[str, str]) -> List[str]:
    """The recorded overrides with config keys renamed (a key that moved in the redesign)."""
    out = []
    for ov in overrides:
        key, value = ov.split("=", 1)
        out.append(f"{renames.get(key, key)}={value}")
    return out


def compare(record: Dict[str, Any], only: Optional[List[str]], renames: Dict[str, str]) -> int:
    env = environment()
    for key in ("torch", "cpu_capability"):
        if record.get(key) != env[key]:
            print(f"note: recorded with {key} {record.get(key)}, now {env[key]}: bits may differ for that reason alone")
    changed = ", ".join(line.split()[-1] for line in env["uncommitted"])
    print(f"recorded at commit {record.get('commit')}; now {env['commit']}"
          + (f" with changes to {changed}" if changed else ""))
    runs = [{"id": rid, "preset": r["preset"], "overrides": renamed(r["overrides"], renames)}
            for rid, r in record["runs"].items() if selected(rid, only)]
    if not runs:
        raise Failure(f"no recorded run matches --only {','.join(only or [])}")
    new = run_all(runs)
    failed, added = 0, 0
    print()
    for run in runs:
        rid = run["id"]
        diff = differences(record["runs"][rid], new[rid])
        if record["runs"][rid]["status"] == "skipped" and new[rid]["status"] == "ran":
            added += 1  # refused when recorded: nothing to compare with (not a failure)
            print(f"{rid:<18} new: refused when recorded, runs now (plan {new[rid]['plan']}); not compared")
        elif diff:
            failed += 1
            print(f"{rid:<18} DIFFERS: {'; '.join(diff)}")
        else:
            print(f"{rid:<18} identical" + (" (refused then and now)" if new[rid]["status"] == "skipped" else ""))
    ran = sum(1 for r in runs if new[r["id"]]["status"] == "ran")
    print(f"\n{len(runs) - failed - added} of {len(runs)} runs identical ({ran} trained), {failed} differ"
          + (f", {added} new" if added else ""))
    return 1 if failed else 0


# --- command line ---------------------------------------------------------------------------------
def parse_only(text: Optional[str]) -> Optional[List[str]]:
    """--only: algorithms (`maml`, `sinusoid`) or single runs (`maml/loop`), comma-separated."""
    if not text:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = {*ALGORITHMS, "sinusoid"}
    unknown = [n for n in names if n.split("/")[0] not in known or n.count("/") > 1
               or ("/" in n and n.split("/")[1] not in MODES)]
    if unknown:
        raise Failure(f"--only: unknown run {unknown[0]!r}; known: {', '.join(ALGORITHMS)}, sinusoid, "
                      f"optionally /{'|'.join(MODES)}")
    return names


def selected(run_id: str, only: Optional[List[str]]) -> bool:
    return not only or run_id in only or run_id.split("/")[0] in only


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    rec = sub.add_parser("record", help="train every run and write the record")
    rec.add_argument("--out", required=True, help="JSON file to write")
    rec.add_argument("--steps", type=int, default=20, help="outer steps of the Omniglot runs (default 20)")
    rec.add_argument("--episodes", type=int, default=50, help="fixed test episodes per run (default 50)")
    rec.add_argument("--hidden", type=int, default=16,
                     help="conv4's filters in the Omniglot runs (default 16; 64 puts conv4's first block on the "
                          "hybrid path's patch statistics, metalearn/models/stem.py)")
    cmp = sub.add_parser("compare", help="rerun the recorded runs; exit 1 if any differs")
    cmp.add_argument("--against", required=True, help="JSON file written by record")
    cmp.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                     help="rerun with config key OLD spelled NEW (a key that moved; repeatable)")
    for s in (rec, cmp):
        s.add_argument("--only", help="comma-separated algorithms (`sinusoid` too) or runs (`maml/loop`) to run")
    args = p.parse_args(argv)
    try:
        only = parse_only(args.only)
        if args.mode == "record":
            if args.steps < 1 or args.episodes < 2:
                raise Failure("--steps must be >= 1 and --episodes >= 2")
            out = Path(args.out)
            if not out.parent.is_dir():
                raise Failure(f"--out: folder {out.parent} does not exist")
            t0 = time.perf_counter()
            runs = run_all(planned_runs(args.steps, args.episodes, only, args.hidden), strict=True)
            doc = {**environment(argv), "what": "final parameters and per-episode test scores of short CPU runs "
                   "(benchmarks/behaviour_record.py)", "steps": args.steps, "episodes": args.episodes,
                   "seconds": round(time.perf_counter() - t0, 1), "runs": runs}
            for note in auto_notes(runs):
                print(note)
            out.write_text(json.dumps(doc, indent=1) + "\n")
            ran = sum(r["status"] == "ran" for r in runs.values())
            print(f"\nwrote {out}: {ran} runs recorded, {len(runs) - ran} skipped, {doc['seconds']:.0f} s")
            return 0
        path = Path(args.against)
        if not path.is_file():
            raise Failure(f"--against: no such file {path}")
        try:
            record = json.loads(path.read_text())
            record["runs"]
        except (ValueError, KeyError, TypeError):
            raise Failure(f"--against: {path} is not a record written by behaviour_record.py") from None
        if any("=" not in r for r in args.rename):
            raise Failure("--rename takes OLD=NEW (e.g. outer.msl_iterations=mamlpp.msl_iterations)")
        return compare(record, only, dict(r.split("=", 1) for r in args.rename))
    except Failure as e:
        print(f"behaviour_record: error: {e}", file=sys.stderr)
        return 2
    except (MetalearnError, OSError) as e:  # metalearn's one-line errors (no data set, ...), unwritable --out
        print(f"behaviour_record: error: {' '.join(str(e).split())[:300]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
