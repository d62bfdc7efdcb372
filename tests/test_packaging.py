"""The package as a pip user gets it: the LICENSE, the commands' help texts, the one-line hint
when an extra is missing (`cbam_jax.cli`), and (slow) a wheel built from this repository,
installed into a fresh virtual environment without its dependencies."""
import email
import hashlib
import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cbam_jax import cli

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"cbam-train": "cbam_jax.cli.train:main", "cbam-evaluate": "cbam_jax.cli.evaluate:main",
            "cbam-predict": "cbam_jax.cli.predict:main", "cbam-export": "cbam_jax.cli.export:main",
            "cbam-parity": "parity.__main__:main"}
# apache.org's LICENSE-2.0.txt (md5 3b83ef96387f14655fc854ddc3c6bd57, the copy jax, optax and
# onnx ship), whose appendix's copyright line is a template to fill in.
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
TEMPLATE_LINE = "   Copyright [yyyy] [name of copyright owner]\n"
COPYRIGHT_LINE = "   Copyright 2026 The cbam-jax Authors\n"


def main_of(command: str):
    module, _, name = COMMANDS[command].partition(":")
    return getattr(importlib.import_module(module), name)


def test_the_license_is_apache_2_0_word_for_word_with_our_copyright_line():
    text = (ROOT / "LICENSE").read_text()
    assert text.count(COPYRIGHT_LINE) == 1
    original = text.replace(COPYRIGHT_LINE, TEMPLATE_LINE)
    assert hashlib.sha256(original.encode()).hexdigest() == APACHE_2_SHA256
    assert hashlib.sha256(text.encode()).hexdigest() != APACHE_2_SHA256  # the line is ours


@pytest.mark.parametrize("command", ["cbam-predict", "cbam-export"])
def test_help_shows_each_default_once(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main_of(command)(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    flags = re.split(r"\n  (?=-)", " ".join(text.split("\n\n")[2:]))  # one chunk per option
    assert len(flags) > 4
    for flag in flags:  # e.g. not "... (default: cifar10, the tutorial's) (default: None)"
        assert len(re.findall(r"default", " ".join(flag.split()))) <= 1, flag


# --- a missing extra: one line naming it -----------------------------------------------------

def _hide(monkeypatch, *modules):
    """As if these packages were not installed: find_spec finds nothing, import raises (their
    submodules that other tests imported too)."""
    for module in modules:
        for name in [m for m in sys.modules if m == module or m.startswith(f"{module}.")]:
            monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.setitem(sys.modules, module, None)


def _one_line(err: str) -> str:
    assert len(err.splitlines()) == 1, err
    return err.strip()


def test_each_command_names_the_extra_it_misses_before_doing_any_work(monkeypatch, tmp_path,
                                                                      capsys):
    image = tmp_path / "image.png"
    image.write_bytes(b"")
    cases = [  # (command, argv, hidden module, extra)
        ("cbam-train", ["--dataset", "digits", "--run-dir", str(tmp_path / "run")],
         "tensorboardX", "train"),
        ("cbam-evaluate", [str(tmp_path / "run"), "--out-dir", str(tmp_path / "out")],
         "sklearn", "train"),
        ("cbam-predict", [str(tmp_path / "run"), str(image)], "PIL", "train"),
        ("cbam-predict", [str(tmp_path / "model.pth"), str(image), "--no-figures"],
         "torch", "parity"),
        ("cbam-export", [str(tmp_path / "run"), "--format", "onnx"], "onnx", "export"),
        ("cbam-export", [str(tmp_path / "run"), "--format", "onnx"], "torch", "export"),
        ("cbam-export", [str(tmp_path / "run")], "orbax", "train"),
        ("cbam-parity", [], "torch", "parity"),
    ]
    for command, argv, hidden, extra in cases:
        with monkeypatch.context() as patch:
            _hide(patch, hidden)
            assert main_of(command)(argv) == 1, command
        line = _one_line(capsys.readouterr().err)
        assert line.startswith(f"error: this command needs {hidden}"), (command, line)
        assert line.endswith(f'which is not installed: pip install "cbam-jax[{extra}]"')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png"]  # no run, no output


def test_an_import_that_fails_inside_a_command_is_the_same_hint():
    """`command` also catches what `require` did not foresee; not an unknown module's."""
    def needs(module):
        @cli.command
        def main(argv=None):
            importlib.import_module(module)
            return 0
        return main

    with pytest.MonkeyPatch.context() as patch:
        _hide(patch, "tqdm")
        assert needs("tqdm")() == 1
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        needs("no_such_module")()


def test_hints_name_the_package_itself_for_its_own_dependencies():
    assert cli.install_hint("jax").endswith("pip install cbam-jax")
    assert cli.install_hint("orbax.checkpoint").endswith('pip install "cbam-jax[train]"')
    assert cli.install_hint("torch", extra="export").endswith('pip install "cbam-jax[export]"')


# --- the wheel -------------------------------------------------------------------------------

def _requirements(metadata: email.message.Message) -> dict[str, set[str]]:
    """{extra ('' for the package's own): normalised distribution names} of a wheel's METADATA."""
    by_extra = {}
    for requirement in metadata.get_all("Requires-Dist"):
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group()
        extra = re.search(r'extra == "([^"]+)"', requirement)
        by_extra.setdefault(extra.group(1) if extra else "", set()).add(_normal(name))
    return by_extra


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.slow
def test_the_wheel_installs_the_commands_which_answer_without_the_extras(tmp_path):
    """About 5 s: a wheel of a copy of the repository (an in-tree build would leave build/ and
    *.egg-info here), installed without dependencies into a venv without pip."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".hypothesis", "runs", "data"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "--quiet", "--wheel-dir", tmp_path / "dist", source],
                   check=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("cbam_jax-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA")).rpartition("/")[0]
        assert archive.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        assert "cbam_jax/py.typed" in names and "parity/__main__.py" in names
        assert not any(n.startswith("tests/") for n in names)
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        metadata = email.message_from_bytes(archive.read(f"{info}/METADATA"))
    scripts = dict(re.findall(r"^(cbam-\w+) = (\S+)$", entry_points, re.M))
    assert scripts == COMMANDS
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "Typing :: Typed" in metadata.get_all("Classifier")
    assert set(metadata.get_all("Project-URL")) == {
        "Paper, https://arxiv.org/abs/1807.06521",
        "Official CBAM code, https://github.com/Jongchan/attention-module"}
    # The hints name the extra that really installs each module (where this venv has it).
    requirements = _requirements(metadata)
    distributions = importlib.metadata.packages_distributions()
    checked = 0
    for module, extra in cli.EXTRA_OF.items():
        for distribution in distributions.get(module, ()):
            assert _normal(distribution) in requirements[extra], (module, extra)
            checked += 1
    assert checked >= len(cli.EXTRA_OF) - 1  # all but TensorFlow, which this venv lacks

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True,
                   timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install",
                    "--no-deps", "--no-index", "--quiet", wheel], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    def run(*argv):
        return subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)

    for command in COMMANDS:
        assert shutil.which(command, path=str(venv / "bin")), command
    helped = run("cbam-train", "--help")  # the recipe is the standard library only
    assert helped.returncode == 0 and helped.stdout.startswith("usage: cbam-train")
    for argv, module, extra in [(["cbam-train", "--dataset", "digits"], "tensorflow_datasets",
                                 "train"),
                                (["cbam-evaluate", "run"], "orbax.checkpoint", "train"),
                                (["cbam-predict", "model.pth", "cat.png"], "PIL", "train"),
                                (["cbam-export", "run", "--format", "onnx"], "torch", "export"),
                                (["cbam-parity"], "torch", "parity")]:
        result = run(*argv)
        assert result.returncode == 1, result.stderr
        assert result.stderr == (f"error: this command needs {module}, which is not "
                                 f'installed: pip install "cbam-jax[{extra}]"\n'), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "source", "venv"]
