"""The README's Python examples run as written (TFF ones only where TFF is installed), and every
row of the bad-input tables (README.md and docs/bad-input.md) gives what it says."""

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BAD_INPUT = README.parent / "docs" / "bad-input.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    code = BLOCKS[index]
    if "tensorflow_federated" in code and importlib.util.find_spec("tensorflow_federated") is None:
        pytest.skip("README example needs the tff extra (tensorflow-federated)")
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme"})


def test_quick_start_is_two_commands():
    quick = README.read_text().split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", quick, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["python3 dev.py run", "python3 dev.py test"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "\npython3 dev.py test\n" in ci


def _table_rows(text):
    rows = []
    for line in text.splitlines():
        match = re.fullmatch(r"\| `(.+?)` \| (.+) \|", line.strip())
        if match:
            rows.append((match.group(1), match.group(2)))
    return rows


def _readme_bad_input_rows():
    return _table_rows(README.read_text().split("## Bad input", 1)[1].split("\n## ", 1)[0])


def _bad_input_rows():
    """Every row of docs/bad-input.md, then the README's rows not already there."""
    rows = _table_rows(BAD_INPUT.read_text())
    return rows + [row for row in _readme_bad_input_rows() if row not in rows]


@pytest.mark.parametrize("code,result", _bad_input_rows())
def test_bad_input_table(code, result):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import fedkernels as fk

    scope = {"jax": jax, "jnp": jnp, "np": np, "fk": fk}
    error = re.fullmatch(r"`(ValueError|TypeError): (.+?)`", result)
    if error:
        kind, message = error.groups()
        prefix = message.split("...")[0] if "..." in message else message
        with pytest.raises({"ValueError": ValueError, "TypeError": TypeError}[kind]) as info:
            eval(code, scope)
        assert str(info.value).startswith(prefix), str(info.value)
        return
    expected = re.match(r"returns `(.+?)`", result)
    assert expected, f"row result must be an error or 'returns `...`': {result}"
    np.testing.assert_array_equal(np.asarray(eval(code, scope)), eval(expected.group(1)))


def test_bad_input_tables_are_not_empty():
    assert len(_readme_bad_input_rows()) >= 10
    assert len(_table_rows(BAD_INPUT.read_text())) >= 40
