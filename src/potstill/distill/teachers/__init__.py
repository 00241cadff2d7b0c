"""Teachers for white-box distillation: the :class:`Teacher` protocol, :class:`HFTeacher`
(a frozen Hugging Face model with logits cut to the vocab shared with the student) and the
top-k logit cache (:mod:`potstill.distill.teachers.cache`).

Model specs and loading live in :mod:`potstill.core.models`. Names are imported lazily so
that ``import potstill.distill.teachers`` does not pull in torch or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from potstill.core.lazy import lazy_exports

if TYPE_CHECKING:
    from potstill.distill.teachers.base import Teacher
    from potstill.distill.teachers.hf import HFTeacher

_EXPORTS = {"Teacher": "base", "HFTeacher": "hf"}

__all__ = ["HFTeacher", "Teacher"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
