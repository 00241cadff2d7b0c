"""HFTeacher: a frozen transformers causal LM behind the :class:`Teacher` protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from potstill.core.errors import PotstillError
from potstill.core.tokenizers import check_tokenizers_agree, logit_width, shared_vocab_size

if TYPE_CHECKING:
    import torch
    from torch import Tensor
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from potstill.core.specs import ModelSpec

__all__ = ["HFTeacher"]


class HFTeacher:
    """A frozen (eval, ``requires_grad=False``) causal LM that returns truncated logits.

    ``vocab_size`` is the returned logit width: the model's own (padded) width unless a
    smaller shared width is given (see :func:`~potstill.core.tokenizers.shared_vocab_size`).

    Outputs are computed under ``torch.no_grad`` rather than ``torch.inference_mode``:
    inference tensors may not be saved for backward, and a KD loss multiplies the teacher's
    probabilities with the student's log-probabilities, which saves them.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str,
        vocab_size: int | None = None,
    ) -> None:
        model_vocab = logit_width(model)
        if vocab_size is None:
            vocab_size = model_vocab
        if not 0 < vocab_size <= model_vocab:
            raise ValueError(f"vocab_size {vocab_size} not in 1..{model_vocab} (model logits)")
        if len(tokenizer) > vocab_size:
            raise PotstillError(
                f"teacher {name!r}: its tokenizer has {len(tokenizer)} tokens but only "
                f"{vocab_size} logits are kept: use a logit width of at least {len(tokenizer)}"
            )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = vocab_size
        self.autocast: torch.dtype | None = None  # set by cast_for_autocast

    def cast_for_autocast(self, dtype: torch.dtype) -> HFTeacher:
        """Hold every linear layer's weight (and bias) in ``dtype`` once, and run the forward
        passes under ``torch.autocast(dtype)``; returns self.

        Autocast casts a frozen fp32 weight to bf16 again at every call: for SmolLM2-135M
        that is 538 MB read and 269 MB written per forward, 82 of 418 ms for a 4 x 256 batch
        on the project's 2-core CPU. Casting once gives bit-identical logits (the same
        rounding of the same weights; norms and the embedding stay fp32, as under autocast).
        A tied output head gets its own copy, so the input embedding is unchanged.
        """
        from torch import nn

        for mod in self.model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight = nn.Parameter(mod.weight.detach().to(dtype), requires_grad=False)
                if mod.bias is not None:
                    mod.bias = nn.Parameter(mod.bias.detach().to(dtype), requires_grad=False)
        self.autocast = dtype
        return self

    def _forward_ctx(self) -> Any:
        import contextlib

        import torch

        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, self.autocast)

    @classmethod
    def from_spec(
        cls,
        spec: str | ModelSpec,
        *,
        student_tokenizer: PreTrainedTokenizerBase | None = None,
        student_vocab_size: int | None = None,
        dtype: torch.dtype | None = None,
        student_name: str = "student",
    ) -> HFTeacher:
        """Load ``spec`` (any form :func:`~potstill.core.models.load_model` takes).

        With ``student_tokenizer`` the tokenizers must agree (PotstillError otherwise);
        with ``student_vocab_size`` (the student's padded logit width) logits are cut to
        ``min(teacher V, student V)``. ``dtype`` defaults to fp32.
        """
        from potstill.core.models import load_model

        model, tok = load_model(spec, dtype=dtype)
        if student_tokenizer is not None:
            check_tokenizers_agree(
                tok, student_tokenizer, teacher_name=str(spec), student_name=student_name
            )
        vocab = logit_width(model)
        if student_vocab_size is not None:
            vocab = shared_vocab_size(vocab, student_vocab_size, tok)
        return cls(model, tok, name=str(spec), vocab_size=vocab)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> HFTeacher:
        """Move the model to ``device``; returns self."""
        self.model.to(device)
        return self

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, T, vocab_size]`` in the model's dtype for ``input_ids [B, T]``.

        Inputs are moved to the model's device; no autograd graph is built. When the
        vocab is cut, the result is a (non-contiguous) view of the full-width output.
        """
        import torch

        ids, mask = self._inputs(input_ids, attention_mask)
        with torch.no_grad(), self._forward_ctx():
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        return out.logits[..., : self.vocab_size]

    def hidden_and_head(
        self, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(final-norm hidden states ``[B, T, H]``, output head ``[vocab_size, H]``).

        ``hidden @ head.T`` equals :meth:`logits`, without materialising ``[B, T, V]``, so
        a fused KD loss can compute it chunk by chunk. PotstillError for models whose
        head is not a plain bias-free linear map (softcapping, logit scaling, bias).
        """
        import torch

        self._check_plain_head()
        ids, mask = self._inputs(input_ids, attention_mask)
        with torch.no_grad(), self._forward_ctx():
            out = self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        head = self.model.get_output_embeddings().weight[: self.vocab_size]
        hidden = out.last_hidden_state
        if self.autocast is not None:  # what autocast would cast it to before the head
            hidden = hidden.to(self.autocast)
        return hidden, head.detach()

    def _inputs(
        self, input_ids: Tensor, attention_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        dev = self.device
        mask = attention_mask.to(dev) if attention_mask is not None else None
        return input_ids.to(dev), mask

    def _check_plain_head(self) -> None:
        cfg = self.model.config
        head = self.model.get_output_embeddings()
        reasons = []
        if head is None or getattr(head, "weight", None) is None:
            reasons.append("no output embedding")
        elif getattr(head, "bias", None) is not None:
            reasons.append("its output head has a bias")
        if getattr(cfg, "final_logit_softcapping", None):
            reasons.append("it soft-caps logits")
        if getattr(cfg, "logit_scale", 1.0) not in (None, 1.0):
            reasons.append("it scales logits")
        if reasons:
            raise PotstillError(
                f"teacher {self.name!r}: hidden_and_head would not reproduce its logits "
                f"({'; '.join(reasons)}): use the plain logits KD path for this model"
            )
