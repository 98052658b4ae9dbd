"""The README's editable install leaves the package visible to a user's type checker: mypy,
run on code outside the repository, sees op_celery's types (an import-hook editable install
hides them, and mypy then calls every task ``Any``)."""

from __future__ import annotations

import re
import site
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_install_flags() -> list[str]:
    """The flags of the README's ``pip install -e`` command for the tests."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"pip install -e '\.\[test\]'(?P<flags>[^&\n]*)&& bash scripts/test", readme)
    assert match, "the README's second command is no longer `pip install -e '.[test]' ...`"
    return match["flags"].split()


def test_mypy_sees_the_typed_tasks_after_the_readmes_editable_install(tmp_path: Path) -> None:
    target = tmp_path / "venv"
    venv.create(target, with_pip=False)
    python = target / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "-e", str(ROOT), *readme_install_flags()],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    # The dependencies (celery and its stubs) come from the test run's own environment.
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    Path(purelib, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    user = tmp_path / "project" / "views.py"
    user.parent.mkdir()
    user.write_text(
        textwrap.dedent(
            """
            import op_celery

            op_celery.track.delay(42)
            reveal_type(op_celery.track.delay("signup"))
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--python-executable", str(python), str(user)],
        capture_output=True, text=True, timeout=300, cwd=user.parent,
    )  # fmt: skip
    assert 'incompatible type "int"; expected "str"' in result.stdout, result.stdout
    assert "AsyncResult[None]" in result.stdout, result.stdout
