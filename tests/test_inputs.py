"""A newcomer's own inputs (issue 33, findings 3, 4 and 8): a config file's relative paths, a
notice for a size cut to the data, the warning before a GPU-sized config runs on a CPU, a teacher
that is the student, and the messages of bad input (the `--set` that gave a bad value and the
value, no class names, "did you mean", YAML positions, line numbers, student or teacher)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import taopd.training.train as tr
from taopd.cli import main
from taopd.config import load_config
from taopd.data import FileTask, size_notice
from taopd.errors import UserError
from taopd.models import check_models, identical_weights
from taopd.training import setup, sizing

SMOLLM2_PARAMS = 134_515_008  # SmolLM2-135M-Instruct


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sums(n: int = 16, split: bool = True) -> list[dict]:
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(n)]
    for i, row in enumerate(rows if split else []):
        row["split"] = "test" if i % 4 == 0 else "train"
    return rows


def cfg_data(tmp_path: Path, student: Path, teacher: Path, task: str | Path) -> dict:
    return {
        "student": str(student), "teacher": str(teacher), "output_dir": str(tmp_path / "run"),
        "task": {"path": str(task), "n_train": 8, "n_test": 4},
        "rollout": {"max_new_tokens": 4},
        "eval": {"max_new_tokens": 4, "heldout_kl_prompts": 0},
        "train": {"steps": 1, "batch_size": 4, "tensorboard": False, "eval_teacher": False,
                  "eval_before": False, "threads": 1},
    }  # fmt: skip


@pytest.fixture
def cfg_file(tmp_path, tiny_model_dir, tiny_model_dir_same_tokenizer) -> Path:
    task = write_jsonl(tmp_path / "sums.jsonl", sums())
    path = tmp_path / "cfg.yaml"
    path.write_text(
        yaml.safe_dump(cfg_data(tmp_path, tiny_model_dir, tiny_model_dir_same_tokenizer, task))
    )
    return path


@pytest.fixture
def no_models(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(tr, "load_model", refuse)


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run the CLI: (exit code, stderr)."""
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def user_error(capsys, *argv: str) -> str:
    """The message of a CLI run that must end in one user error (exit 2, no traceback)."""
    rc, err = cli(capsys, *argv)
    assert rc == 2 and "Traceback" not in err, err
    return err.split("taopd: error: ", 1)[1].rstrip("\n")


# ------------------------------------------------------------------------ relative paths


def test_a_config_files_relative_paths_are_looked_up_beside_it(
    tmp_path, monkeypatch, tiny_model_dir
):
    proj = tmp_path / "proj"
    write_jsonl(proj / "configs" / "my.jsonl", sums())
    shutil.copytree(tiny_model_dir, proj / "configs" / "models" / "student")
    write_jsonl(proj / "here.jsonl", sums())
    (proj / "configs" / "my.yaml").write_text("student: models/student\ntask: {path: my.jsonl}\n")
    (proj / "configs" / "cwd.yaml").write_text("task: {path: here.jsonl}\n")
    monkeypatch.chdir(proj)
    cfg = load_config("configs/my.yaml")
    assert cfg.task.path == "configs/my.jsonl" and cfg.student == "configs/models/student"
    assert cfg.teacher == "smollm2"  # the bundled model's name is never a path
    assert load_config("configs/cwd.yaml").task.path == "here.jsonl"  # else the working directory
    # a --set value (and a dict from Python) is taken as given: relative to the working directory
    assert load_config("configs/my.yaml", ["task.path=here.jsonl"]).task.path == "here.jsonl"
    assert load_config({"task": {"path": "my.jsonl"}}).task.path == "my.jsonl"


def test_a_relative_path_found_nowhere_names_both_places(
    capsys, tmp_path, monkeypatch, tiny_model_dir, tiny_model_dir_same_tokenizer, no_models
):
    proj = (tmp_path / "proj").resolve()
    (proj / "configs").mkdir(parents=True)
    data = cfg_data(tmp_path, tiny_model_dir, tiny_model_dir_same_tokenizer, "data/none.jsonl")
    (proj / "configs" / "x.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(proj)
    assert user_error(capsys, "train", "configs/x.yaml") == (
        f"task file data/none.jsonl does not exist: looked for {proj}/configs/data/none.jsonl "
        f"(beside the config configs/x.yaml) and {proj}/data/none.jsonl (in the working directory)"
    )
    write_jsonl(proj / "configs" / "sums.jsonl", sums())
    data.update(student="./models/s", task={**data["task"], "path": "sums.jsonl"})
    (proj / "configs" / "x.yaml").write_text(yaml.safe_dump(data))
    assert user_error(capsys, "train", "configs/x.yaml") == (
        f"student model folder ./models/s does not exist: looked for {proj}/configs/models/s "
        f"(beside the config configs/x.yaml) and {proj}/models/s (in the working directory)"
    )
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ sizes cut to the data


def test_a_size_cut_to_the_data_is_announced(capsys, cfg_file, no_models):
    # selection.k=1000 stops the run at the model checks, after the data's
    rc, err = cli(capsys, "train", str(cfg_file), "--set", "task.n_test=20", "--set",
                  "selection.k=1000", "--set", "eval.heldout_kl_prompts=32")  # fmt: skip
    assert rc == 2
    assert err.splitlines()[:2] == [
        'taopd: task.n_test 20 > 4 test problems in sums.jsonl (split by its "split" field: 4 of '
        "16 records are test problems): using 4",
        "taopd: eval.heldout_kl_prompts 32 > 4 test problems: using 4",
    ]
    rc, err = cli(capsys, "train", str(cfg_file), "--set", "selection.k=1000")
    assert err.startswith("taopd: error: ")  # nothing cut: no notice


def test_a_hash_split_says_how_it_split(tmp_path):
    task = FileTask(write_jsonl(tmp_path / "my.jsonl", sums(60, split=False)))
    got = len(task.examples("test", 20))
    assert 0 < got < 20
    assert size_notice(task, "test", 20, got, "task.n_test") == (
        f"task.n_test 20 > {got} test problems in my.jsonl (split by a hash of the question, ~10% "
        f'to test; a "split" field chooses: {got} of 60 records are test problems): using {got}'
    )
    assert size_notice(task, "test", got, got, "task.n_test") is None


# ------------------------------------------------------------------------ GPU-sized on a CPU


def test_a_gpu_sized_config_on_a_cpu_warns_and_the_cpu_recipes_do_not():
    rate = 40e9  # fp32 matmul FLOP/s: this 2-core machine measured 27-41 G under load
    for name in ("demo", "cot", "mismatch"):
        assert (
            sizing.gpu_sized_warning(load_config(name), SMOLLM2_PARAMS, SMOLLM2_PARAMS, 60, rate)
            is None
        )
    qwen = load_config("qwen2.5-7b-to-1.5b-gsm8k")  # issue 33: run with a 135M pair on a CPU
    msg = sizing.gpu_sized_warning(qwen, SMOLLM2_PARAMS, SMOLLM2_PARAMS, 150, rate)
    assert msg is not None and msg.startswith(
        "warning: this config is GPU-sized and runs on a CPU: batch 64 × 512 new tokens (+ ~150 "
        "prompt tokens) with a 135M-parameter student and a 135M-parameter teacher is ~54.4TFLOP "
        "a step; on this CPU (~40GFLOP/s fp32 matmul) a step may take ~23 min, 200 steps ~75.6 h."
    )


def test_the_run_checks_warn_of_a_gpu_sized_config(capsys, monkeypatch, cfg_file):
    cfg = load_config(cfg_file)
    setup.check(cfg).close()  # tiny models: CPU-sized
    assert "GPU-sized" not in capsys.readouterr().err
    monkeypatch.setattr(sizing, "cpu_matmul_flops", lambda: 1e3)  # a very slow CPU
    setup.check(cfg).close()
    err = capsys.readouterr().err
    assert err.startswith("taopd: warning: this config is GPU-sized and runs on a CPU: batch 4 × 4")


# ------------------------------------------------------------------------ teacher = student


def test_a_teacher_that_is_the_student_is_refused(
    capsys, cfg_file, tiny_model_dir, tmp_path, no_models
):
    why = (
        "distilling a model into itself gives zero signals and zero loss at every position, so "
        "nothing would train; give a stronger or fine-tuned teacher (or teacher_sft, to fine-tune "
        "it on the task first)"
    )
    msg = user_error(capsys, "train", str(cfg_file), "--set", f"teacher={tiny_model_dir}")
    same = f"student '{tiny_model_dir}' and teacher '{tiny_model_dir}'"
    assert msg == f"{same} are the same model folder: {why}"
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    msg = user_error(capsys, "train", str(cfg_file), "--set", f"teacher={copy}")
    assert msg == f"student '{tiny_model_dir}' and teacher '{copy}' hold identical weights: {why}"
    assert not (tmp_path / "run").exists()
    cfg = load_config(cfg_file, [f"teacher={tiny_model_dir}", "teacher_sft={steps: 1}"])
    check_models(cfg)  # a fine-tuned teacher is another model


def test_identical_weights_compares_the_first_layer_and_the_heads(
    tmp_path, tiny_model_dir, tiny_model_dir_same_tokenizer
):
    assert identical_weights(tiny_model_dir, shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    assert not identical_weights(tiny_model_dir, tiny_model_dir_same_tokenizer)
    tuned = shutil.copytree(tiny_model_dir, tmp_path / "tuned")
    weights = load_file(tuned / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.weight"][0, 0] += 1e-3
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    assert not identical_weights(tiny_model_dir, tuned)
    assert not identical_weights(tiny_model_dir, tmp_path / "no-such-folder")


# ------------------------------------------------------------------------ messages


def test_a_bad_set_value_is_reported_against_the_set_with_its_value(capsys, cfg_file, no_models):
    msg = user_error(capsys, "train", str(cfg_file), "--set", "selection.ratio=1.5")
    assert msg == (
        "invalid config (--set selection.ratio=1.5): selection.ratio: ratio must be in (0, 1] "
        "(share of valid positions kept), got 1.5"
    )
    msg = user_error(capsys, "train", str(cfg_file), "--set", "rollout.prompt_overflow=wrap")
    assert msg == (
        "invalid config (--set rollout.prompt_overflow=wrap): rollout.prompt_overflow: Input "
        "should be 'truncate' or 'skip', got 'wrap'"
    )


def test_problems_of_the_file_and_of_a_set_each_name_their_source(capsys, tmp_path, cfg_file):
    data = yaml.safe_load(cfg_file.read_text())
    data["train"].update(steps="many", batchsize=4)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    msg = user_error(capsys, "train", str(bad), "--set", "selection.k=0")
    assert msg.splitlines() == [
        "invalid config:",
        "  --set selection.k=0: selection.k: Input should be greater than or equal to 1, got 0",
        f"  {bad}:",
        "    train.steps: Input should be a valid integer, unable to parse string as an integer, "
        "got 'many'",
        "    train.batchsize: unknown key (did you mean train.batch_size?)",
    ]


def test_no_message_names_a_class(capsys, cfg_file, no_models):
    for section in ("selection", "teacher_server", "lora", "teacher_sft"):
        msg = user_error(capsys, "train", str(cfg_file), "--set", f"{section}=0.1")
        assert msg.startswith(
            f"invalid config (--set {section}=0.1): {section}: should be a section"
        )
        assert msg.endswith(", got 0.1") and not re.search(r"Cfg\b|TeacherSFT|instance of", msg)


def test_unknown_keys_get_a_did_you_mean(capsys, tmp_path):
    bad = tmp_path / "keys.yaml"
    bad.write_text("ratio: 0.1\nselection: {ratoi: 0.1}\ncolour: blue\n")
    msg = user_error(capsys, "train", str(bad))
    assert msg.splitlines()[1:] == [
        "  selection.ratoi: unknown key (did you mean selection.ratio?)",
        "  ratio: unknown key (did you mean selection.ratio?)",
        "  colour: unknown key",
    ]


def test_bad_yaml_names_the_file_line_and_column(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: smollm2\nselection:\n  ratio: 0.1\n   k: 3\n")
    assert user_error(capsys, "train", str(bad)) == (
        f"config {bad} is not valid YAML at line 4, column 5: mapping values are not allowed here"
    )


def test_a_record_without_its_answer_names_its_line(tmp_path):
    path = tmp_path / "my.jsonl"
    path.write_text(
        '{"question": "1 + 1?", "answer": "2"}\n\n{"question": "2 + 2?"}\n'
        '{"question": "3 + 3?", "answer": ""}\n'
    )
    with pytest.raises(UserError) as err:
        FileTask(path)
    assert str(err.value) == (
        f"task file {path}, line 3: the record has no 'answer' (task.answer_field); 2 of 3 "
        "records lack it (lines 3, 4); fields of that record: question"
    )
    path = tmp_path / "my.json"
    path.write_text(json.dumps([{"question": "1 + 1?", "answer": "2"}, {"answer": "4"}]))
    with pytest.raises(UserError, match=r"my.json, record 2: the record has no 'question'"):
        FileTask(path)
