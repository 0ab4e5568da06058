"""Replay a newcomer's first hour with taopd (issue 33) end to end, as a user would type it.

In a fresh temporary folder it writes its own JSONL task (question/answer records), two tiny
random Llama folders that share a tokenizer (built offline, nothing is downloaded) and a config
beside the JSONL whose `task.path` is relative, then runs `taopd` through subprocess from that
folder and checks each outcome:

1. `--output-dir` on a folder holding the user's own file: refused, the file untouched;
2. a first run; `--overwrite` after the user added a file to the run folder: the file survives;
3. `--resume` with a changed experiment: refused with the list of differences; with more
   `train.steps`: accepted, "resuming from step N", config.yaml and summary.json agree;
4. wrong inputs (a record without its answer, a misspelled key, a bad `--set` value, the student
   as its own teacher, a missing model folder): one clear line each, nothing written;
5. Ctrl-C (SIGINT) after the first step: a calm stop line; the printed resume command finishes
   the run at the step asked;
6. `taopd eval` of the trained checkpoint.

It prints one PASS/FAIL line per check and exits 1 if any failed. A few CPU minutes in all
(tiny models, a few steps of 2 prompts); `tests/test_newcomer_walk.py` runs it (`-m slow`).

    python scripts/newcomer_walk.py [--keep DIR]

`--keep DIR` walks in DIR (a new or empty folder) and leaves it there for a look afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = "my-pair/my.yaml"  # relative to the walk's folder, where taopd runs
TASK = "my-task.jsonl"  # beside the config, named relative to it
N_RECORDS = 60
N_TEST = 20  # more than the file's test side holds: taopd says so and uses what there is
STEPS = 2  # of the first run; the resume adds one
CTRL_C_STEPS = 6  # of the run stopped by SIGINT after its first step
TIMEOUT = 900  # seconds per taopd command (a busy CPU can be many times slower than an idle one)


# ----------------------------------------------------------------------------- the user's files
def split_of(question: str) -> str:
    """taopd's split of a record without a "split" field (docs/own-pair.md)."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 10 == 0 else "train"


def write_task(path: Path) -> int:
    """N_RECORDS sums as question/answer JSONL records; returns how many land on the test side."""
    rng = random.Random(0)
    records = []
    while len(records) < N_RECORDS:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        q = f"What is {a} + {b}?"
        if q not in (r["question"] for r in records):
            records.append({"question": q, "answer": str(a + b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return sum(split_of(r["question"]) == "test" for r in records)


def write_config(path: Path) -> None:
    """The newcomer's config: the demo's shape at toy size, their task and model folders."""
    cfg = {
        "student": "models/student",  # relative to the working directory (the walk's folder)
        "teacher": "models/teacher",
        "task": {
            "path": TASK,  # beside this file
            "prompt_field": "question",
            "answer_field": "answer",
            "n_train": 200,
            "n_test": N_TEST,
            "prompt_suffix": "Answer with only the number.",
            "seed": 0,
        },
        "rollout": {"max_new_tokens": 6, "temperature": 1.0},
        "selection": {"strategy": "teachability", "ratio": 0.2, "k": 16},
        "loss": {"kind": "reverse_kl"},
        "optim": {"lr": 1.0e-4},
        "train": {
            "steps": STEPS,
            "batch_size": 2,
            "eval_every": 0,
            "save_every": 1,
            "keep_last": 2,
            "seed": 0,
            "threads": 1,
            "samples_every": 0,
            "tensorboard": False,
        },  # fmt: skip
        "eval": {"batch_size": 8, "max_new_tokens": 6, "heldout_kl_prompts": 2},
        "output_dir": "runs/my-pair",
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


MODELS = """
import sys
sys.path.insert(0, sys.argv[1])
from tests.helpers import make_tiny_model_dir
make_tiny_model_dir("models/student", seed=0)
make_tiny_model_dir("models/teacher", seed=1, hidden=48, layers=3)
"""


def make_models(root: Path, env: dict[str, str]) -> None:
    """The user's two model folders, models/student and models/teacher: tiny random Llamas of
    different sizes with one tokenizer (tests/helpers.py, offline), built in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-c", MODELS, str(REPO)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if proc.returncode != 0:
        raise SystemExit(f"building the tiny models failed:\n{proc.stderr[-3000:]}")


# ----------------------------------------------------------------------------- running taopd
class Walk:
    """Runs `taopd` in `root` as the user would and keeps the PASS/FAIL of each check."""

    def __init__(self, root: Path, n_test: int) -> None:
        self.root = root
        self.n_test = n_test  # the held-out problems the task file holds (its test side)
        self.failed: list[str] = []
        self.passed = 0
        src = str(REPO / "src")
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        self.env["TOKENIZERS_PARALLELISM"] = "false"
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))

    def argv(self, args: list[str]) -> list[str]:
        """`taopd ARGS` as this Python runs it (the checkout's src first on its path)."""
        if args and args[0] == "taopd":
            args = args[1:]
        return [sys.executable, "-m", "taopd", *args]

    def taopd(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `taopd ARGS` in the walk's folder; its exit code, stdout and stderr."""
        return subprocess.run(
            self.argv(list(args)),
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )

    def check(self, step: str, ok: bool, what: str, proc: Any = None) -> bool:
        """Print `PASS|FAIL step: what`; on a failure, the end of the command's output."""
        print(f"{'PASS' if ok else 'FAIL'} {step}: {what}", flush=True)
        if ok:
            self.passed += 1
            return True
        self.failed.append(f"{step}: {what}")
        if proc is not None:
            tail = (proc.stdout or "")[-1500:] + (proc.stderr or "")[-3000:]
            print("  | " + "\n  | ".join(tail.strip().splitlines()), flush=True)
        return False

    def one_error(
        self, step: str, proc: subprocess.CompletedProcess[str], says: list[str], out: str
    ) -> bool:
        """A refused command: exit 2, one `taopd: error:` line on stderr holding each of `says`
        (other lines only taopd's notices, no traceback), and `out` (its run folder) not made."""
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("taopd: error: ")]
        line = errors[0] if len(errors) == 1 else ""
        missing = [s for s in says if s not in line]
        ok = (
            proc.returncode == 2
            and line != ""
            and all(ln.startswith("taopd: ") for ln in lines)
            and not missing
            and not (self.root / out).exists()
        )
        what = f"one line naming {', '.join(repr(s) for s in says)}; {out}/ not created"
        if not ok:
            what += f" (exit {proc.returncode}, {len(errors)} error lines, missing {missing})"
        return self.check(step, ok, what, proc)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def config_steps(run: Path) -> Any:
    """train.steps of a run folder's config.yaml (None if unreadable)."""
    try:
        return yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def logged_steps(run: Path) -> list[int]:
    """The steps of a run folder's metrics.jsonl, in order."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln)["step"] for ln in path.read_text().splitlines() if ln.strip()]


def trained(
    walk: Walk, step: str, proc: subprocess.CompletedProcess[str], run: str, n: int
) -> bool:
    """A finished run: exit 0, its table printed, summary.json and config.yaml at `n` steps."""
    summary = read_json(walk.root / run / "summary.json") or {}
    ok = (
        proc.returncode == 0
        and "taopd train" in proc.stdout
        and f"run folder: {run}" in proc.stdout
        and summary.get("steps") == n
        and config_steps(walk.root / run) == n
        and logged_steps(walk.root / run) == list(range(1, n + 1))
        and (walk.root / run / "checkpoints" / f"step-{n:06d}" / "model").is_dir()
        and "Traceback" not in proc.stderr
    )
    what = (
        f"exit 0, summary table; summary.json, config.yaml and metrics.jsonl at {n} steps; "
        f"checkpoints/step-{n:06d}/model"
    )
    if not ok:
        what += f" (exit {proc.returncode}, summary steps {summary.get('steps')})"
    return walk.check(step, ok, what, proc)


# ----------------------------------------------------------------------------- the walk
def step1_foreign_folder(walk: Walk) -> None:
    """Finding 1: a folder holding the user's notes is never written into (nor marked)."""
    notes = walk.root / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("buy milk\n")
    proc = walk.taopd("train", CONFIG, "--output-dir", "notes", "--no-progress")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    ok = (
        proc.returncode == 2
        and len(lines) == 1
        and lines[0].startswith("taopd: error: output_dir notes was not created by taopd")
        and "holds todo.txt" in lines[0]
        and sorted(p.name for p in notes.iterdir()) == ["todo.txt"]
        and (notes / "todo.txt").read_text() == "buy milk\n"
    )
    walk.check(
        "1 folder with the user's todo.txt",
        ok,
        "`--output-dir notes` refused in one line naming todo.txt; notes/ holds only todo.txt, "
        "unchanged",
        proc,
    )


def step2_run_and_overwrite(walk: Walk) -> None:
    """A first run (relative task.path, the size notice); --overwrite keeps the user's file."""
    proc = walk.taopd("train", CONFIG, "--output-dir", "runs/first", "--no-progress")
    trained(walk, "2 first run", proc, "runs/first", STEPS)
    n_test = walk.n_test
    cut = f"taopd: task.n_test {N_TEST} > {n_test} test problems in {TASK}"
    walk.check(
        "2 first run",
        cut in proc.stderr and f"using {n_test}" in proc.stderr,
        f"relative task.path found beside the config; the notice '{cut} ...: using {n_test}'",
        proc,
    )
    walk.check(
        "2 first run",
        "Setting accelerator to CPU" not in proc.stderr,
        "no DeepSpeed 'Setting accelerator to CPU' notice (DeepSpeed is not used)",
        proc,
    )
    mine = walk.root / "runs" / "first" / "my-notes.txt"
    mine.write_text("lr 1e-4 looked fine\n")
    proc = walk.taopd("train", CONFIG, "--output-dir", "runs/first", "--overwrite", "--no-progress")
    trained(walk, "2 --overwrite", proc, "runs/first", STEPS)
    kept = "taopd: --overwrite kept what taopd did not write in runs/first: my-notes.txt"
    walk.check(
        "2 --overwrite",
        mine.is_file() and mine.read_text() == "lr 1e-4 looked fine\n" and kept in proc.stderr,
        f"the user's my-notes.txt survives, and stderr says '{kept}'",
        proc,
    )


def step3_resume(walk: Walk) -> None:
    """Finding 2: a resume that changes the experiment is refused with what differs; one that
    asks for more steps goes on, says so, and config.yaml and summary.json agree."""
    run = walk.root / "runs" / "first"
    before = (run / "config.yaml").read_text()
    proc = walk.taopd(
        "train", CONFIG, "--output-dir", "runs/first", "--resume", "--no-progress",
        "--set", "selection.strategy=reverse_kl", "--set", "teacher=models/student",
    )  # fmt: skip
    says = [
        "--resume: this config changes the experiment of the run in runs/first",
        "selection.strategy: teachability → reverse_kl",
        "teacher: models/teacher → models/student",
    ]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    missing = [s for s in says if not (len(lines) == 1 and s in lines[0])]
    ok = (
        proc.returncode == 2
        and not missing
        and (run / "config.yaml").read_text() == before
        and logged_steps(run) == list(range(1, STEPS + 1))
    )
    walk.check(
        "3 --resume, other strategy and teacher",
        ok,
        "refused in one line listing selection.strategy and teacher (old → new); config.yaml "
        f"and metrics.jsonl unchanged{f' (missing {missing})' if missing else ''}",
        proc,
    )
    more = STEPS + 1
    proc = walk.taopd(
        "train", CONFIG, "--output-dir", "runs/first", "--resume", "--no-progress",
        "--set", f"train.steps={more}",
    )  # fmt: skip
    trained(walk, "3 --resume, more steps", proc, "runs/first", more)
    line = f"taopd: resuming from step {STEPS}; changed: train.steps {STEPS} → {more}"
    resumes = (read_json(run / "summary.json") or {}).get("resumes")
    ok = line in proc.stderr and resumes == [
        {"step": STEPS, "changed": {"train.steps": [STEPS, more]}}
    ]
    walk.check(
        "3 --resume, more steps",
        ok,
        f"prints '{line}'; summary.json's resumes record it (got {resumes})",
        proc,
    )


def step4_wrong_inputs(walk: Walk) -> None:
    """Findings 4 and 8: each wrong input is one clear line, and no run folder is created."""
    pair = walk.root / "my-pair"
    lines = (pair / TASK).read_text().splitlines()
    lines[2] = json.dumps({"question": json.loads(lines[2])["question"]})  # line 3: no answer
    (pair / "no-answer.jsonl").write_text("\n".join(lines) + "\n")
    proc = walk.taopd(
        "train", CONFIG, "--set", "task.path=my-pair/no-answer.jsonl",
        "--output-dir", "runs/bad-record", "--no-progress",
    )  # fmt: skip
    says = ["task file my-pair/no-answer.jsonl, line 3: the record has no 'answer'", "(line 3)"]
    walk.one_error("4 record without its answer", proc, says, "runs/bad-record")

    text = (pair / "my.yaml").read_text().replace("selection:", "selction:")
    (pair / "typo.yaml").write_text(text)
    proc = walk.taopd("train", "my-pair/typo.yaml", "--output-dir", "runs/typo", "--no-progress")
    says = ["invalid config (my-pair/typo.yaml): selction: unknown key (did you mean selection?)"]
    walk.one_error("4 misspelled key", proc, says, "runs/typo")

    proc = walk.taopd(
        "train", CONFIG, "--set", "train.steps=many", "--output-dir", "runs/bad-set",
        "--no-progress",
    )  # fmt: skip
    says = ["invalid config (--set train.steps=many): train.steps:", "'many'"]
    walk.one_error("4 bad --set value", proc, says, "runs/bad-set")

    proc = walk.taopd(
        "train", CONFIG, "--set", "teacher=models/student", "--output-dir", "runs/same",
        "--no-progress",
    )  # fmt: skip
    says = ["student 'models/student' and teacher 'models/student' are the same model folder"]
    walk.one_error("4 teacher = student", proc, says, "runs/same")

    proc = walk.taopd(
        "train", CONFIG, "--set", "teacher=./models/techer", "--output-dir", "runs/no-teacher",
        "--no-progress",
    )  # fmt: skip
    says = ["teacher model folder ./models/techer does not exist"]
    walk.one_error("4 missing teacher folder", proc, says, "runs/no-teacher")


def interrupt_after_first_step(walk: Walk, run: Path, args: list[str]) -> tuple[int, str]:
    """Start `taopd ARGS`, press Ctrl-C (SIGINT to its process group) once metrics.jsonl holds a
    step; return its exit code and stderr."""
    err_path = walk.root / "ctrl-c.stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            walk.argv(args),
            cwd=walk.root,
            env=walk.env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
        deadline = time.monotonic() + TIMEOUT
        try:
            while not logged_steps(run) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=TIMEOUT)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return code, err_path.read_text()


def step5_ctrl_c(walk: Walk) -> None:
    """Ctrl-C after the first step: a calm stop and a resume command that finishes the run."""
    run = walk.root / "runs" / "ctrl-c"
    args = [
        "train", CONFIG, "--set", f"train.steps={CTRL_C_STEPS}", "--output-dir", "runs/ctrl-c",
        "--no-progress",
    ]  # fmt: skip
    code, err = interrupt_after_first_step(walk, run, args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    stopped = logged_steps(run)[-1] if logged_steps(run) else 0
    calm = (
        f"taopd: stopped by SIGINT at step {stopped}; checkpoint saved at "
        f"{Path('runs/ctrl-c/checkpoints') / f'step-{stopped:06d}'}; resume with: "
    )
    ok = (
        code == 128 + signal.SIGINT
        and "taopd: SIGINT: stopping after this step and saving a checkpoint" in err
        and last.startswith(calm)
        and "taopd: error:" not in err
        and "Traceback" not in err
        and 0 < stopped < CTRL_C_STEPS
        and not (run / "summary.json").exists()
    )
    what = f"exit 130 at step {stopped} of {CTRL_C_STEPS}, no 'taopd: error:'; last line '{last}'"
    proc = subprocess.CompletedProcess(args, code, "", err)
    if not walk.check("5 Ctrl-C", ok, what, proc):
        return
    command = last.split("resume with: ", 1)[1]
    proc = walk.taopd(*shlex.split(command))
    trained(walk, "5 the printed resume command", proc, "runs/ctrl-c", CTRL_C_STEPS)
    walk.check(
        "5 the printed resume command",
        f"taopd: resuming from step {stopped}" in proc.stderr,
        f"`{command}` prints 'resuming from step {stopped}' and ends at step {CTRL_C_STEPS}",
        proc,
    )


def step6_eval(walk: Walk) -> None:
    """`taopd eval` of the trained checkpoint on the held-out problems."""
    ckpt, n_test = f"runs/first/checkpoints/step-{STEPS + 1:06d}", walk.n_test
    proc = walk.taopd("eval", CONFIG, "--model", ckpt, "--json", "runs/eval.json", "--no-progress")
    result = read_json(walk.root / "runs" / "eval.json") or {}
    head = f"{ckpt}/model: accuracy "
    ok = (
        proc.returncode == 0
        and proc.stdout.startswith(head)
        and f"on {n_test} held-out" in proc.stdout
        and result.get("n") == n_test
        and 0.0 <= result.get("accuracy", -1) <= 1.0
    )
    walk.check(
        "6 taopd eval", ok, f"'{head}... on {n_test} held-out ...', eval.json n={n_test}", proc
    )


# ----------------------------------------------------------------------------- main
def walk_in(root: Path) -> int:
    """Set up the user's files in `root`, walk, print the tally; 0 if every check passed."""
    start, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    pair = root / "my-pair"
    pair.mkdir(parents=True)
    n_test = write_task(pair / TASK)
    write_config(pair / "my.yaml")
    walk = Walk(root, n_test)
    make_models(root, walk.env)
    print(f"walk in {root}: {N_RECORDS} records ({n_test} on the test side), two tiny models")
    for step in (
        step1_foreign_folder, step2_run_and_overwrite, step3_resume, step4_wrong_inputs,
        step5_ctrl_c, step6_eval,
    ):  # fmt: skip
        try:
            step(walk)
        except Exception as e:  # noqa: BLE001 - e.g. an earlier failure left a file missing
            walk.check(step.__name__, False, f"raised {type(e).__name__}: {e}")
    end = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime
    print(
        f"{walk.passed} passed, {len(walk.failed)} failed in {time.monotonic() - wall:.0f} s "
        f"({cpu:.0f} s of CPU in its subprocesses)"
    )
    for failure in walk.failed:
        print(f"  FAIL {failure}")
    return 1 if walk.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", metavar="DIR", help="walk in DIR (new or empty) and keep it")
    args = parser.parse_args(argv)
    if args.keep:
        root = Path(args.keep).resolve()
        if root.exists() and any(root.iterdir()):
            parser.error(f"--keep {args.keep}: the folder is not empty")
        return walk_in(root)
    with tempfile.TemporaryDirectory(prefix="taopd-walk-") as tmp:
        return walk_in(Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
