"""A CPU run's output carries taopd's lines, not third-party notices about unused tools (issue
33: every CPU run printed DeepSpeed's "Setting accelerator to CPU" warning)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

from taopd.errors import DEEPSPEED_CPU_NOTICE, quiet_deepspeed_notice

SRC = str(Path(__file__).resolve().parents[1] / "src")
NOTICE = (
    "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."  # noqa: E501
)


def _python(code: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd,
        timeout=timeout,
    )  # fmt: skip


def test_importing_taopd_does_not_import_deepspeed(tmp_path):
    code = (
        "import sys\n"
        "import taopd, taopd.cli, taopd.models, taopd.training.train, taopd.training.evaluate\n"
        "import taopd.reports.report, taopd.experiments.compare\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'))\n"
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_a_cpu_train_run_prints_no_deepspeed_notice(
    tmp_path, tiny_model_dir, tiny_model_dir_same_tokenizer
):
    """transformers' save_pretrained imports DeepSpeed whenever it is installed (accelerate's
    unwrap), so the run below imports it at its checkpoint; its CPU notice stays off."""
    rows = [
        {"question": f"{i} + 1?", "answer": str(i + 1), "split": "train" if i % 4 else "test"}
        for i in range(24)
    ]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "student": str(tiny_model_dir), "teacher": str(tiny_model_dir_same_tokenizer),
        "output_dir": str(tmp_path / "run"),
        "task": {"path": str(tmp_path / "sums.jsonl"), "n_train": 8, "n_test": 2},
        "rollout": {"max_new_tokens": 3}, "eval": {"max_new_tokens": 3, "heldout_kl_prompts": 0},
        "train": {"steps": 1, "batch_size": 2, "report_to": ["none"], "threads": 1,
                  "eval_teacher": False, "eval_before": False},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code = (
        "import sys\n"
        "from taopd.cli import main\n"
        "rc = main(['train', 'cfg.yaml', '--no-progress'])\n"
        "print('deepspeed imported:', 'deepspeed' in sys.modules)\n"
        "sys.exit(rc)\n"
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert DEEPSPEED_CPU_NOTICE not in proc.stdout + proc.stderr
    if importlib.util.find_spec("deepspeed") is not None:  # installed: the import did happen
        assert "deepspeed imported: True" in proc.stdout


def test_the_filter_drops_that_line_only_and_comes_off(caplog):
    logger = logging.getLogger("DeepSpeed")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        quiet_deepspeed_notice()
        quiet_deepspeed_notice()  # twice: still one filter
        logger.warning(NOTICE)
        logger.warning("ZeRO stage 3 is slow on CPU")
        quiet_deepspeed_notice(False)  # the DeepSpeed engine: DeepSpeed's own voice
        logger.warning(NOTICE)
    finally:
        logger.removeHandler(handler)
        quiet_deepspeed_notice(False)
    assert seen == ["ZeRO stage 3 is slow on CPU", NOTICE]
