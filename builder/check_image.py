"""Build-time check of the worker image: run by the Dockerfile after the installs, fails the build.

    python builder/check_image.py --cuda 12.6 builder/requirements.txt builder/requirements-cuda.txt

Checks that
- every `name==version` pin in the given files is what is installed (pip kept the base image's
  torch and replaced nothing it should not have);
- torch is a CUDA build of the chosen CUDA (`torch.version.cuda` starts with `--cuda`);
- a C compiler and the Python headers work: Triton (under Liger) compiles a small C launcher that
  includes Python.h at first use, and fails with "Failed to find C compiler" without them. The
  check compiles and links such a file the same way (gcc -shared -fPIC with Python's include dir).

Standard library only, apart from importing torch for its CUDA build.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib import metadata
from pathlib import Path

PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)")
LAUNCHER = "#include <Python.h>\nstatic PyObject *noop(PyObject *self, PyObject *args) { Py_RETURN_NONE; }\n"


def pins(path: Path) -> dict[str, str]:
    """`name==version` lines of a requirements file (comments, options and includes skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m:
            out[m[1]] = m[2]
    return out


def public(version: str) -> str:
    """The version without its local label: 2.13.0+cu126 -> 2.13.0."""
    return version.split("+", 1)[0]


def check_pins(files: list[Path]) -> list[str]:
    problems = []
    for path in files:
        for name, wanted in pins(path).items():
            try:
                found = metadata.version(name)
            except metadata.PackageNotFoundError:
                problems.append(f"{name}=={wanted} ({path}) is not installed")
                continue
            if public(found) != public(wanted):
                problems.append(f"{name}=={wanted} ({path}) but {found} is installed")
    return problems


def check_torch_cuda(cuda: str) -> list[str]:
    import torch

    built = torch.version.cuda
    if built is None:
        return [f"torch {torch.__version__} is not a CUDA build; the image needs CUDA {cuda}"]
    if built != cuda and not built.startswith(cuda + "."):
        return [f"torch {torch.__version__} is built for CUDA {built}, the image is for CUDA {cuda}"]
    return []


def check_compiler(cc: str = "gcc") -> list[str]:
    exe = shutil.which(cc)
    if exe is None:
        return [f"no C compiler ({cc}) on PATH: Triton cannot build its launcher"]
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    if version.returncode != 0:
        return [f"`{cc} --version` failed: {version.stderr.strip()[:200]}"]
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        return [f"no Python.h in {include}: install this Python's headers"]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "launcher.c"
        src.write_text(LAUNCHER)
        cmd = [exe, "-shared", "-fPIC", "-O1", f"-I{include}", str(src), "-o", str(Path(tmp) / "launcher.so")]
        built = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if built.returncode != 0:
        return [f"{cc} could not build a Python extension: {built.stderr.strip()[-400:]}"]
    return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cuda", help="the CUDA version torch must be built for, e.g. 12.6 (omit to skip)")
    p.add_argument("--cc", default="gcc", help="the C compiler Triton will find")
    p.add_argument("requirements", nargs="*", type=Path, help="pinned requirements files to compare")
    a = p.parse_args(argv)
    problems = check_pins(a.requirements) + check_compiler(a.cc)
    if a.cuda:
        problems += check_torch_cuda(a.cuda)
    for problem in problems:
        print(f"image check: {problem}", file=sys.stderr)
    if not problems:
        print(f"image check: pins, {a.cc} + Python.h" + (f", torch CUDA {a.cuda}" if a.cuda else "") + ": ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
