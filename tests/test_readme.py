"""The README's promises: it opens with what cbam-jax is and its results, its set-up commands
exist, and every Python example in it runs (tests/test_docs.py checks its links and paths)."""
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_names_the_paper_the_official_code_and_the_tutorial():
    intro = README.split("\n## ", 1)[0]
    assert "https://arxiv.org/abs/1807.06521" in intro
    assert "https://github.com/Jongchan/attention-module" in intro
    assert "Python打卡day49" in intro  # the tutorial's own title


def test_readme_opens_with_a_results_table_before_any_command():
    first_section = README.split("\n## ", 2)[1]
    assert first_section.startswith("Results\n")
    assert re.search(r"^\|.*\|$", first_section, flags=re.M)
    assert README.index("\n## Results") < README.index("```")


def test_readme_first_commands_are_the_setup_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert commands == ["make train", "make test", "make test-all"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^train: install$", makefile, flags=re.M)
    assert re.search(r"^test: install$", makefile, flags=re.M)
    assert re.search(r"^test-all: install$", makefile, flags=re.M)
    assert re.search(r"^FAST_TIER := .* -m pytest .*-m \"not slow\"", makefile, flags=re.M)
    assert re.search(r"^test: install\n\t\$\(FAST_TIER\)$", makefile, flags=re.M)
    # test-all: every test (no -m filter), on the same workers, in tests/conftest.py's order
    assert re.search(r"^test-all: install\n\t\$\(PY\) -m pytest -q \$\(XDIST\) "
                     r"--no-loadscope-reorder$", makefile, flags=re.M)
    assert re.search(r"^XDIST := -n \$\(WORKERS\) --dist loadfile", makefile, flags=re.M)


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make install" in ci and re.search(r"^make test-all$", ci, flags=re.M)


def test_readme_has_python_examples():
    assert PYTHON_BLOCKS


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_example_runs(index, tmp_path):
    script = tmp_path / f"readme_example_{index}.py"
    script.write_text(PYTHON_BLOCKS[index])
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_library_imports_without_torch():
    code = ("import sys, builtins\n"
            "real_import = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name == 'torch' or name.startswith('torch.'): raise ImportError('no torch')\n"
            "    return real_import(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "import cbam_jax, cbam_jax.train, cbam_jax.nnx\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_the_longest_files_then_those_with_slow_tests_are_handed_out_first():
    """`make test-all`'s workers take whole files in collection order: the long files first."""
    from types import SimpleNamespace

    from conftest import pytest_collection_modifyitems

    def item(path, name, slow=False):
        return SimpleNamespace(path=pathlib.Path(path), name=name,
                               get_closest_marker=lambda marker: marker == "slow" and slow)
    items = [item("a.py", "a1"), item("b.py", "b1"), item("b.py", "b2", slow=True),
             item("c.py", "c1"), item("d.py", "d1", slow=True), item("d.py", "d2"),
             item("test_gpu_check.py", "g1", slow=True), item("test_kill.py", "k1", slow=True)]
    pytest_collection_modifyitems(None, items)
    assert [i.name for i in items] == ["k1", "g1", "b1", "b2", "d1", "d2", "a1", "c1"]
