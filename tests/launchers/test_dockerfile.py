"""docker/Dockerfile cannot be built here: check that every file it copies exists and that its
install commands are the Makefile's install recipe, line for line."""
from __future__ import annotations

import re
import shlex

from launch_helpers import REPO


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def makefile_install_recipe() -> list[str]:
    text = (REPO / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+)\s*\??:?=\s*(.*)$", text, re.M))
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", text, re.M)
    assert recipe, "the Makefile has an install recipe for $(STAMP)"

    def expand(value: str) -> str:
        for _ in range(5):
            value = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), value)
        return value

    # the image's choices for the Makefile's variables
    variables.update({"PYTHON": "python3", "TORCH_SPEC": "$TORCH_SPEC"})
    return [expand(line.strip()) for line in recipe.group(1).splitlines()]


def test_every_copied_file_exists():
    copies = [rest for word, rest in dockerfile_instructions() if word == "COPY"]
    assert copies
    for rest in copies:
        *sources, _dest = shlex.split(rest)
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    copied = {s.rstrip("/") for rest in copies for s in shlex.split(rest)[:-1]}
    assert {"pyproject.toml", "Makefile", "framework", "launchers", "configs"} <= copied


def test_install_commands_are_the_makefiles():
    runs = [rest for word, rest in dockerfile_instructions() if word == "RUN"]
    recipe = makefile_install_recipe()
    assert recipe[0].startswith("test -x .venv/bin/python")
    install = [r for r in runs if ".venv" in r]
    assert install == recipe, f"Dockerfile:\n{install}\nMakefile:\n{recipe}"
    from_line = [rest for word, rest in dockerfile_instructions() if word == "FROM"]
    assert len(from_line) == 1 and from_line[0].startswith("nvidia/cuda:")
    torch_arg = [rest for word, rest in dockerfile_instructions() if word == "ARG" and rest.startswith("TORCH_SPEC=")]
    pinned = re.search(r"^TORCH_SPEC \?= (torch==\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert torch_arg and pinned in torch_arg[0], "the image pins the Makefile's torch version"
