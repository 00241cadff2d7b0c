"""llama.cpp as a serving peer: llama-cpp-python's OpenAI server in its own environment.

llama-cpp-python ships only a source distribution on PyPI, so the first use builds it
(about 15 minutes on 2 cores) into ``.venv-llamacpp`` beside the repository's ``.venv``;
later runs find it there. It never enters potstill's own environment or lock file: it is a
rival measured from outside, over HTTP, like vLLM's server.

The server is run as a user would run it: ``python -m llama_cpp.server --model FILE.gguf``,
with the thread counts set to the benchmark's and everything else at its defaults. Two of
those defaults matter to a comparison:

* it serves one request at a time (one ``Llama`` object behind a lock), so 8 clients queue;
* ``logits_all`` is on, so top-k logprobs need no restart (and every prompt position's
  logits are computed during prefill).

One setting may be changed, and only when the defaults crash: ggml's AMX kernels (an "extra
buffer type", chosen where the CPU reports AMX) died with SIGSEGV in
``ggml_backend_amx_mul_mat`` on the first decode on this project's 2-core Xeon. Then the server
runs with extra buffer types off (llama.cpp's ``--no-repack``, ``use_extra_bufts = false``),
i.e. ggml's AVX-512 kernels, as on a CPU without AMX. :func:`defaults_crash` decides, by one
tiny completion in a subprocess, and the benchmark records which way it went.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["LLAMACPP_VERSION", "defaults_crash", "ensure_llamacpp", "llamacpp_server_argv"]

#: The pinned release (the newest on PyPI when the benchmark was written).
LLAMACPP_VERSION = "0.3.36"


def _has_llamacpp(python: Path) -> bool:
    if not python.is_file():
        return False
    probe = [str(python), "-c", f"import llama_cpp; assert llama_cpp.__version__ == {LLAMACPP_VERSION!r}"]  # fmt: skip
    return subprocess.run(probe, capture_output=True).returncode == 0


def ensure_llamacpp(venv: Path) -> Path:
    """The Python of ``venv`` with llama-cpp-python[server] ``LLAMACPP_VERSION`` installed,
    building it there first if it is missing (its output goes to ``venv/build.log``)."""
    python = venv / "bin" / "python"
    if _has_llamacpp(python):
        return python
    print(f"building llama-cpp-python {LLAMACPP_VERSION} into {venv} (~15 min on 2 cores; "
          f"log: {venv / 'build.log'})", file=sys.stderr, flush=True)  # fmt: skip
    t0 = time.perf_counter()
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    with (venv / "build.log").open("w") as log:
        subprocess.run(
            [str(python), "-m", "pip", "install", f"llama-cpp-python[server]=={LLAMACPP_VERSION}"],
            stdout=log, stderr=subprocess.STDOUT, env=env, check=True,
        )  # fmt: skip
    print(f"llama-cpp-python built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return python


# Run before llama_cpp loads a model: every Llama gets use_extra_bufts = False (--no-repack).
_NO_EXTRA_BUFTS = """
import llama_cpp.llama_cpp as lc
_default = lc.llama_model_default_params
def _params():
    p = _default()
    p.use_extra_bufts = False
    return p
lc.llama_model_default_params = _params
"""
_PROBE = """
import sys
from llama_cpp import Llama
m = Llama(model_path=sys.argv[1], n_threads=1, verbose=False)
m.create_completion("The owl is a bird that lives in old forests and hunts at night.", max_tokens=4)
"""
_SERVER = """
import runpy, sys
sys.argv[0] = "llama_cpp.server"
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


def defaults_crash(python: Path, gguf: Path) -> bool:
    """Whether a short completion (a 16-token prompt: the AMX kernels run on prompt batches) with llama-cpp-python's defaults dies on ``gguf`` while
    the same completion with extra buffer types off succeeds (else the failure is not the
    AMX path's and is raised)."""
    plain = subprocess.run([str(python), "-c", _PROBE, str(gguf)], capture_output=True, text=True)
    if plain.returncode == 0:
        return False
    fallback = subprocess.run([str(python), "-c", _NO_EXTRA_BUFTS + _PROBE, str(gguf)],
                              capture_output=True, text=True)  # fmt: skip
    if fallback.returncode != 0:
        raise RuntimeError(f"llama.cpp fails on {gguf} either way:\n{fallback.stderr[-2000:]}")
    return True


def llamacpp_server_argv(
    python: Path, gguf: Path, name: str, threads: int, *, extra_bufts: bool = True
) -> list[str]:
    """The server's argv (``--port`` is appended by the caller): ``threads`` for decoding and
    for prompt processing; the model answers to ``name``; ``extra_bufts=False`` is
    ``--no-repack`` (see the module docstring)."""
    boot = _SERVER if extra_bufts else _NO_EXTRA_BUFTS + _SERVER
    return [str(python), "-c", boot, "--model", str(gguf), "--model_alias", name,
            "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--host", "127.0.0.1"]  # fmt: skip
