"""Teacher on plain transformers: runs on CPU and GPU, batched, bf16 on GPU."""

from __future__ import annotations

import numpy as np
import torch

from mft_pipeline.models import model_vocab_size
from mft_pipeline.teacher.base import TeacherScores
from mft_pipeline.teacher.tail_samples import sample_outside


class TransformersTeacher:
    """Scores packed sequences with a transformers causal LM.

    The vocabulary projection runs ``chunk_tokens`` positions at a time in float32, so the
    full-vocab log-softmax of a whole batch is never held at once.
    """

    name = "transformers"
    # The full logits are at hand, so ids can be drawn from the teacher's tail.
    samples_tail = True
    # One forward holds the logits of every row it gets: the caller bounds them (--batch-size).
    schedules_rows = False

    def __init__(self, model, chunk_tokens: int = 2048):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.vocab_size = model_vocab_size(model)
        self.max_top_k = self.vocab_size
        self.chunk_tokens = chunk_tokens
        self._lm_head = model.get_output_embeddings()
        self._softcap = getattr(model.config, "final_logit_softcapping", None)
        self._split_head = self._head_matches_model()

    def _hidden_to_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._lm_head(hidden).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    @torch.inference_mode()
    def _head_matches_model(self) -> bool:
        """Whether base model + output embedding reproduce the model's logits.

        Running the two halves separately is what lets the vocab projection be chunked; models
        that scale their logits in other ways fall back to the full forward.
        """
        probe = torch.arange(8, device=self.device)[None] % self.vocab_size
        full = self.model(input_ids=probe).logits.float()
        try:
            mine = self._hidden_to_logits(self.model.base_model(input_ids=probe).last_hidden_state)
        except (AttributeError, TypeError):
            return False
        return mine.shape == full.shape and torch.allclose(mine, full, atol=1e-3, rtol=1e-3)

    @torch.inference_mode()
    def score(self, input_ids: np.ndarray, num_tokens: np.ndarray, top_k: int, tail_uniforms: np.ndarray | None = None) -> TeacherScores:
        if top_k > self.max_top_k:
            raise ValueError(f"top_k={top_k} exceeds the teacher's vocabulary ({self.max_top_k})")
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        num = torch.as_tensor(num_tokens, dtype=torch.long, device=self.device)
        B, T = ids.shape
        positions = torch.arange(T, device=self.device)
        attention_mask = (positions[None] < num[:, None]).long()
        if self._split_head:
            hidden = self.model.base_model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
            source, project = hidden[:, :-1].reshape(B * (T - 1), -1), self._hidden_to_logits
        else:
            logits = self.model(input_ids=ids, attention_mask=attention_mask).logits
            source, project = logits[:, :-1].reshape(B * (T - 1), -1), lambda x: x.float()
        labels = ids[:, 1:].reshape(-1)
        out_ids = torch.empty(B * (T - 1), top_k, dtype=torch.long, device=self.device)
        out_lp = torch.empty(B * (T - 1), top_k, dtype=torch.float32, device=self.device)
        out_label = torch.empty(B * (T - 1), dtype=torch.float32, device=self.device)
        out_tail = uniforms = None
        if tail_uniforms is not None:
            if tail_uniforms.ndim != 3 or tail_uniforms.shape[:2] != (B, T - 1):
                raise ValueError(f"tail_uniforms shape {tail_uniforms.shape} must be (B, T - 1, N) = ({B}, {T - 1}, N)")
            uniforms = torch.as_tensor(tail_uniforms).reshape(B * (T - 1), -1)
            out_tail = torch.empty(B * (T - 1), uniforms.shape[-1], dtype=torch.long, device=self.device)
        for start in range(0, B * (T - 1), self.chunk_tokens):
            sl = slice(start, start + self.chunk_tokens)
            z = project(source[sl])
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            top = torch.topk(z, top_k, dim=-1, sorted=True)
            out_ids[sl] = top.indices
            out_lp[sl] = top.values - lse
            out_label[sl] = z.gather(-1, labels[sl, None]).squeeze(-1) - lse.squeeze(-1)
            if out_tail is not None:
                # Last, as it overwrites the chunk's logits.
                out_tail[sl] = sample_outside(z, torch.cat([top.indices, labels[sl, None]], dim=-1), uniforms[sl])
        valid = (positions[None, :-1] < (num[:, None] - 1)).reshape(-1)
        out_ids[~valid] = 0
        out_lp[~valid] = 0
        out_label[~valid] = 0
        if out_tail is not None:
            out_tail[~valid] = 0
        return TeacherScores(
            topk_ids=out_ids.view(B, T - 1, top_k).cpu().numpy(),
            topk_logprobs=out_lp.view(B, T - 1, top_k).cpu().numpy(),
            label_logprobs=out_label.view(B, T - 1).cpu().numpy(),
            tail_ids=None if out_tail is None else out_tail.view(B, T - 1, -1).cpu().numpy(),
        )

    def close(self) -> None:
        """Nothing to stop: the model is a plain module, freed with the teacher."""

    def library_versions(self) -> dict[str, str]:
        import transformers

        return {"transformers": transformers.__version__, "torch": torch.__version__}
