import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs_as_written(capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "teachability:" in out
    kept = re.search(r"kept (\d+) of (\d+) positions", out)
    assert kept and int(kept.group(1)) == 13 and int(kept.group(2)) == 256  # ⌈0.05·256⌉
