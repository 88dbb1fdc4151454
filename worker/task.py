"""Built-in training task: a small GPT-style byte-level language model.

Contents:

* :class:`TaskConfig` -- immutable hyper-parameters of the model, convertible
  to and from a ``dict[str, str]`` so it can ride in safetensors metadata.
* :class:`ByteGPT` -- token + learned position embeddings, pre-LayerNorm
  transformer blocks (causal self-attention via
  ``torch.nn.functional.scaled_dot_product_attention`` and a GELU MLP), a
  final LayerNorm and an untied output head over the 256 byte values;
  ``qk_norm`` adds a LayerNorm on each head's queries and keys (off by default).
* :func:`save_model` / :func:`load_model` -- safetensors checkpoints carrying
  the config in their metadata.
* :func:`generate` -- seeded sampling of bytes from a model.

Threading: everything here is plain PyTorch and blocking.  A ``ByteGPT`` is
no more thread-safe than any ``nn.Module``: concurrent forward passes are
fine, but do not mutate parameters (optimizer steps, ``load_state_dict``)
while another thread reads them.  :func:`generate` temporarily switches the
model to eval mode, so do not run it concurrently with training on the same
module.  :func:`save_model` writes to a temporary file and renames it, so a
concurrent reader never sees a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)


_BOOL = {"True": True, "False": False}.__getitem__


@dataclass(frozen=True)
class TaskConfig:
    """Hyper-parameters of :class:`ByteGPT` (defaults: about 0.48 M parameters)."""

    vocab: int = 256
    context: int = 128
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    qk_norm: bool = False  # LayerNorm on each head's queries and keys (bounds the attention logits)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "qk_norm":
                if not isinstance(value, bool):
                    raise ValueError(f"TaskConfig.qk_norm must be a bool, got {value!r}")
            elif f.name != "dropout" and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"TaskConfig.{f.name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(f"TaskConfig.d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TaskConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def to_metadata(self) -> dict[str, str]:
        """Return the config as a string dict (safetensors metadata)."""
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_metadata(cls, d: dict[str, str]) -> TaskConfig:
        """Inverse of :meth:`to_metadata`; unknown keys are ignored, missing keys get defaults."""
        kwargs: dict[str, int | float] = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                convert = _BOOL if isinstance(f.default, bool) else float if isinstance(f.default, float) else int
                try:
                    kwargs[f.name] = convert(d[f.name])
                except (ValueError, KeyError) as exc:
                    raise ValueError(f"bad metadata value {f.name}={d[f.name]!r}") from exc
        return cls(**kwargs)  # type: ignore[arg-type]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection."""

    def __init__(self, config: TaskConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        head = config.d_model // config.n_head
        self.q_norm = nn.LayerNorm(head) if config.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head) if config.qk_norm else nn.Identity()
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        shape = (b, t, self.n_head, c // self.n_head)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: TaskConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.fc = nn.Linear(config.d_model, hidden)
        self.fc_proj = nn.Linear(hidden, config.d_model)
        self.mlp_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp_drop(self.fc_proj(F.gelu(self.fc(self.ln2(x)))))


class ByteGPT(nn.Module):
    """GPT-style language model over bytes; ``forward(idx[B,T]) -> logits[B,T,vocab]``."""

    def __init__(self, config: TaskConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else TaskConfig()
        cfg = self.config
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2L)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            assert isinstance(block, Block)
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=resid_std)
            nn.init.normal_(block.fc_proj.weight, mean=0.0, std=resid_std)

    def num_parameters(self) -> int:
        """Total number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, t = idx.shape
        if t > self.config.context:
            raise ValueError(f"sequence length {t} exceeds context {self.config.context}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (nats per token) of predicting ``targets`` from ``idx``."""
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def save_model(model: ByteGPT, config: TaskConfig, path: str | Path) -> None:
    """Write ``model.state_dict()`` to a safetensors file with ``config`` in its metadata.

    The file is written next to ``path`` and renamed into place (atomic on POSIX).
    """
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=config.to_metadata())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.debug("saved ByteGPT (%d tensors) to %s", len(tensors), path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[ByteGPT, TaskConfig]:
    """Build a :class:`ByteGPT` from a file written by :func:`save_model` (strict load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    if not metadata:
        raise ValueError(f"{path} has no TaskConfig metadata; was it written by save_model?")
    config = TaskConfig.from_metadata(metadata)
    model = ByteGPT(config).to(device)
    model.load_state_dict(load_file(str(path), device=str(device)), strict=True)
    logger.debug("loaded ByteGPT %s from %s", config, path)
    return model, config


@torch.no_grad()
def generate(
    model: ByteGPT,
    prompt: bytes,
    max_new_bytes: int,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
) -> bytes:
    """Sample ``max_new_bytes`` bytes continuing ``prompt``; returns only the new bytes.

    The conditioning window is cropped to the last ``model.config.context``
    bytes.  An empty prompt is conditioned on ``b"\\n"``.  ``temperature <= 0``
    means greedy decoding; ``top_k`` of ``None`` or ``0`` disables top-k
    filtering.  The same model, prompt and seed give the same bytes.
    """
    if max_new_bytes < 0:
        raise ValueError(f"max_new_bytes must be >= 0, got {max_new_bytes}")
    if model.config.vocab > 256:
        raise ValueError(f"generate needs a byte vocabulary (<= 256), got {model.config.vocab}")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    idx = torch.tensor(list(prompt or b"\n"), dtype=torch.long, device=device).unsqueeze(0)
    out: list[int] = []
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_bytes):
            logits = model(idx[:, -model.config.context :])[0, -1].float()
            if temperature <= 0:
                nxt = int(torch.argmax(logits))
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                nxt = int(torch.multinomial(probs, 1, generator=gen))
            out.append(nxt)
            idx = torch.cat([idx, idx.new_tensor([[nxt]])], dim=1)[:, -model.config.context :]
    finally:
        model.train(was_training)
    return bytes(out)
