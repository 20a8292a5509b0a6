"""The draft for SmolLM2-135M: an EAGLE-style one-layer head on the target's features,
and the SpecDec++ acceptance-prediction head.

Why EAGLE: no second model with SmolLM2's vocabulary exists offline, a truncated target
accepts too rarely, and an int8 copy costs ~0.3 of a target step.  One decoder layer that
predicts the target's next *feature* (its post-final-norm hidden state) from
``(feature_t, embedding(token_{t+1}))`` reuses the target's embeddings and LM head and
costs ~1/30 of the target's layers.  The LM head is restricted to the ``vocab`` most
frequent tokens of the training text: the full 49k-row head alone is ~1/6 of a target
step on CPU, the 8k-row one ~1/100.  Tokens outside the subset are never drafted, so
the draft distribution q is zero there, which speculative sampling allows.

Layout of the draft sequence: draft position ``i`` reads the pair
``(f_i, x_{i+1})`` (target feature of token i, embedding of token i+1), writes K/V at
rotary position ``i`` and outputs ``f^_{i+1}``, whose LM-head logits predict ``x_{i+2}``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from archon_server.engine.runner import int8_linear, quantize_int8


@dataclass
class DraftConfig:
    hidden: int = 576
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    intermediate: int = 1536
    rms_eps: float = 1e-5
    rope_theta: float = 100000.0
    vocab_size: int = 49152  # the target's full vocabulary
    draft_vocab: int = 8192  # rows of the restricted LM head
    target_id: str = "smollm2-135m-instruct"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (HF's rotate_half convention) for x [B, heads, T, D] at positions pos [T]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    ang = pos.float()[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    h = d // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos + rot * sin


class DraftKV:
    """K/V of the draft's single layer for one sequence; rollback = slicing."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def crop(self, length: int) -> None:
        if self.k is not None and length < self.k.shape[2]:
            self.k = self.k[:, :, :length]
            self.v = self.v[:, :, :length]  # type: ignore[index]


class EagleDraft(nn.Module):
    def __init__(self, cfg: DraftConfig, embed: torch.Tensor, vocab_ids: torch.Tensor):
        """``embed``: the target's token embeddings (frozen, also its tied LM head);
        ``vocab_ids``: the ``draft_vocab`` token ids the restricted LM head covers."""
        super().__init__()
        self.cfg = c = cfg
        self.register_buffer("embed", embed, persistent=False)
        self.register_buffer("vocab_ids", vocab_ids.long(), persistent=True)
        self.register_buffer("lm_head", embed[vocab_ids].clone(), persistent=False)
        self.fc = nn.Linear(2 * c.hidden, c.hidden, bias=True)
        self.attn_norm = RMSNorm(c.hidden, c.rms_eps)
        self.q = nn.Linear(c.hidden, c.heads * c.head_dim, bias=False)
        self.k = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.v = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.o = nn.Linear(c.heads * c.head_dim, c.hidden, bias=False)
        self.mlp_norm = RMSNorm(c.hidden, c.rms_eps)
        self.gate = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.up = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.down = nn.Linear(c.intermediate, c.hidden, bias=False)
        self.final_norm = RMSNorm(c.hidden, c.rms_eps)
        self._int8: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        feats: torch.Tensor,
        tokens: torch.Tensor,
        kv: DraftKV | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """feats [B, T, H] (f_i), tokens [B, T] (x_{i+1}) -> predicted features [B, T, H].

        With ``kv`` (B = 1) the pairs are appended at positions ``start..start+T-1`` after
        the cache is cropped to ``start``; without it, a plain causal pass (training).
        """
        c = self.cfg
        B, T, _ = feats.shape
        lin = self._lin
        x = lin("fc", torch.cat([feats, self.embed[tokens]], dim=-1))
        h = self.attn_norm(x)
        q = lin("q", h).view(B, T, c.heads, c.head_dim).transpose(1, 2)
        k = lin("k", h).view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        v = lin("v", h).view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        pos = torch.arange(start, start + T, device=feats.device)
        q, k = _rope(q, pos, c.rope_theta), _rope(k, pos, c.rope_theta)
        if kv is not None:
            kv.crop(start)
            if kv.k is not None:
                k = torch.cat([kv.k, k], dim=2)
                v = torch.cat([kv.v, v], dim=2)  # type: ignore[list-item]
            kv.k, kv.v = k, v
        groups = c.heads // c.kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        L = k.shape[2]
        if T == 1:
            mask = None  # one query sees every cached key
        else:
            qpos = torch.arange(L - T, L, device=feats.device)
            mask = torch.arange(L, device=feats.device)[None, :] <= qpos[:, None]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + lin("o", a.transpose(1, 2).reshape(B, T, -1))
        h = self.mlp_norm(x)
        x = x + lin("down", F.silu(lin("gate", h)) * lin("up", h))
        return self.final_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Restricted-vocabulary logits [..., draft_vocab] of predicted features."""
        if self._int8 and not self.training and hidden.dtype == torch.bfloat16:
            return int8_linear(hidden, *self._int8["lm_head"])
        return hidden @ self.lm_head.T

    # ------------------------------------------------------------------ int8 inference
    _INT8_ROWS = 4  # int8 GEMV kernels win at a few rows; catch-up passes over more tokens keep bf16

    def _lin(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layer: nn.Linear = getattr(self, name)
        if self._int8 and not self.training and x.dtype == torch.bfloat16 and x.numel() // x.shape[-1] <= self._INT8_ROWS:
            return int8_linear(x, *self._int8[name], layer.bias)
        return layer(x)

    def quantize_int8(self) -> "EagleDraft":
        """Per-output-channel int8 copies of the projections and the LM head for drafting steps
        in bf16 (the engine runner's trick: a one-token step reads half the bytes; measured
        ~0.3-0.4 ms of a ~1.2 ms step saved).  The draft only proposes, so rounding never
        changes what is emitted."""
        mats = {n: getattr(self, n).weight for n in ("fc", "q", "k", "v", "o", "gate", "up", "down")}
        self._int8 = quantize_int8({**mats, "lm_head": self.lm_head}, torch.bfloat16)
        return self

    def full_logits(self, hidden: torch.Tensor, fill: float = float("-inf")) -> torch.Tensor:
        """Logits over the target's whole vocabulary (-inf outside the draft vocabulary)."""
        out = torch.full((*hidden.shape[:-1], self.cfg.vocab_size), fill, dtype=torch.float32, device=hidden.device)
        out[..., self.vocab_ids] = self.logits(hidden).float()
        return out

    # ------------------------------------------------------------------ io
    def save(self, folder: Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(_half(self.state_dict()), str(folder / "draft.safetensors"))
        meta = {"kind": "eagle1", "stored_dtype": "float16", **asdict(self.cfg), **(extra or {})}
        (folder / "draft.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path, embed: torch.Tensor) -> "EagleDraft":
        from safetensors.torch import load_file

        meta = json.loads((folder / "draft.json").read_text())
        fields = DraftConfig.__dataclass_fields__
        cfg = DraftConfig(**{k: v for k, v in meta.items() if k in fields})
        sd = _float(load_file(str(folder / "draft.safetensors")))
        model = cls(cfg, embed, sd["vocab_ids"])
        model.load_state_dict(sd, strict=False)
        return model.eval()

    @classmethod
    def init_from_target(cls, cfg: DraftConfig, target_sd: dict[str, torch.Tensor], vocab_ids: torch.Tensor,
                         layer: int) -> "EagleDraft":
        """Start from the target's layer ``layer`` (and its final norm): training then only has
        to adapt a working layer to the fused input instead of learning one from scratch."""
        embed = target_sd["model.embed_tokens.weight"].float()
        m = cls(cfg, embed, vocab_ids)
        p = f"model.layers.{layer}."
        with torch.no_grad():
            m.attn_norm.weight.copy_(target_sd[p + "input_layernorm.weight"])
            m.mlp_norm.weight.copy_(target_sd[p + "post_attention_layernorm.weight"])
            for name, src in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                              ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
                              ("down", "mlp.down_proj")):
                getattr(m, name).weight.copy_(target_sd[p + src + ".weight"])
            m.final_norm.weight.copy_(target_sd["model.norm.weight"])
            # fc starts as "feature + embedding" so the residual stream begins near a sensible point
            m.fc.weight.zero_()
            m.fc.bias.zero_()
            eye = torch.eye(cfg.hidden)
            m.fc.weight[:, : cfg.hidden] = eye
            m.fc.weight[:, cfg.hidden :] = eye
        return m


HEAD_READS = ("candidate", "proposer")
N_PROPOSER_STATS = 6


def proposal_stats(q: torch.Tensor, q_y: torch.Tensor, first: torch.Tensor | float) -> torch.Tensor:
    """Scalar features of a proposal for a ``proposer`` head, from the drafting distribution
    ``q`` [..., V] (any slice of the vocabulary that holds all of its mass, e.g. the draft's
    own) and the proposal's probability ``q_y`` [...]: log q(y), log(1 - q(y)), the log of the
    two largest probabilities of q (their gap is how close the draft's argmax was to flipping),
    the entropy of q (nats) and whether y is the round's first candidate.  The first feature is
    the whole signal of the head-free ``cumprob`` rule, so the head knows what that rule knows."""
    q, q_y = q.float(), q_y.float()
    top2 = q.topk(2, dim=-1).values
    eps = 1e-6
    ent = -torch.special.xlogy(q, q).sum(-1)
    first_t = torch.as_tensor(first, dtype=torch.float32, device=q.device).expand_as(q_y)
    return torch.stack([torch.log(q_y.clamp_min(eps)), torch.log((1 - q_y).clamp_min(eps)),
                        torch.log(top2[..., 0].clamp_min(eps)), torch.log(top2[..., 1].clamp_min(eps)), ent, first_t],
                       dim=-1)


class AcceptHead(nn.Module):
    """SpecDec++ acceptance-prediction head: ``n`` residual blocks ``x + SiLU(W x + b)``, then ``Linear(h, 2)``.

    ``tied=True`` reuses one block ``n`` times, as the authors' code does through
    ``[Block()] * n``; ``tied=False`` gives each block its own weights.

    ``reads`` says which draft state judges candidate ``y_j``:

    - ``"candidate"`` (the authors'): the hidden state of the draft step whose *input* is
      ``y_j``.  The head runs one step behind, so deciding to stop after ``y_k`` costs a draft
      forward whose proposal is thrown away (the round's first candidate counts as accepted).
    - ``"proposer"`` (ours): the hidden state that *proposed* ``y_j``, with ``y_j``'s embedding
      and :func:`proposal_stats` of the drafting distribution, through one input projection
      ``Linear(2h + 6, h)``.  Everything it reads exists when ``y_j`` is drawn, so the stop
      rule costs a head call and no extra draft step.
    """

    def __init__(self, hidden: int, n_blocks: int = 3, tied: bool = False, reads: str = "candidate"):
        super().__init__()
        if reads not in HEAD_READS:
            raise ValueError(f"reads must be one of {HEAD_READS}, not {reads!r}")
        self.hidden, self.n_blocks, self.tied, self.reads = hidden, n_blocks, tied, reads
        self.inp = nn.Linear(2 * hidden + N_PROPOSER_STATS, hidden) if reads == "proposer" else None
        self.blocks = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(1 if tied else n_blocks)])
        for b in self.blocks:  # start as identity so the blocks only refine
            nn.init.zeros_(b.weight)
            nn.init.zeros_(b.bias)
        self.out = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [..., 2]; index 1 = accept.  ``x``: the hidden state ([..., h]), or for a
        ``proposer`` head :meth:`proposer_input`'s [..., 2h + 6]."""
        if self.inp is not None:
            x = self.inp(x)
        for i in range(self.n_blocks):
            blk = self.blocks[0 if self.tied else i]
            x = x + F.silu(blk(x))
        return self.out(x)

    @staticmethod
    def proposer_input(hidden: torch.Tensor, cand_embed: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        return torch.cat([hidden.float(), cand_embed.float(), stats.float()], dim=-1)

    def accept_prob(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.forward(x).float(), dim=-1)[..., 1]

    def save(self, folder: Path, meta: dict) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(_half(self.state_dict()), str(folder / "head.safetensors"))
        full = {"hidden": self.hidden, "blocks": self.n_blocks, "tied": self.tied, "reads": self.reads,
                "stored_dtype": "float16", **meta}
        (folder / "head.json").write_text(json.dumps(full, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> tuple["AcceptHead", dict]:
        """Our format (``head.json`` + ``head.safetensors``) or the authors' released one."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "head.json").exists() and (folder / "config.json").exists():
            return cls.load_authors(folder)
        meta = json.loads((folder / "head.json").read_text())
        head = cls(meta["hidden"], meta["blocks"], meta["tied"], meta.get("reads", "candidate"))
        head.load_state_dict(_float(load_file(str(folder / "head.safetensors"))))
        return head.eval(), meta

    @classmethod
    def load_authors(cls, folder: Path) -> tuple["AcceptHead", dict]:
        """A head saved by the SpecDec++ authors' code (``AcceptancePredictionHead``, a
        ``PyTorchModelHubMixin``): ``config.json`` = ``{"hidden_size", "num_layers"}`` and
        ``model.safetensors`` (or ``pytorch_model.bin``) with ``model.<i>.linear.*`` for the
        residual blocks and ``model.<num_layers>.*`` for the output layer.  Their blocks are
        one module repeated (``[ResBlock(h)] * n``), so the head loads as tied; the keys of
        each index are read anyway, and differing ones make it untied."""
        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        hidden, n = int(cfg["hidden_size"]), int(cfg.get("num_layers", 0))
        if (folder / "model.safetensors").exists():
            from safetensors.torch import load_file

            sd = load_file(str(folder / "model.safetensors"))
        else:
            sd = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        sd = _float(sd)
        blocks = [(sd.get(f"model.{i}.linear.weight"), sd.get(f"model.{i}.linear.bias")) for i in range(n)]
        required = [f"model.{n}.weight", f"model.{n}.bias"] + (["model.0.linear.weight", "model.0.linear.bias"] if n else [])
        missing = [k for k in required if k not in sd]
        if missing:
            raise ValueError(f"{folder}: missing {missing} - not an AcceptancePredictionHead checkpoint")
        # safetensors drops the repeated names of a shared tensor: fill them from the first block
        blocks = [(w if w is not None else blocks[0][0], b if b is not None else blocks[0][1]) for w, b in blocks]
        tied = all(torch.equal(w, blocks[0][0]) and torch.equal(b, blocks[0][1]) for w, b in blocks)
        head = cls(hidden, n, tied)
        with torch.no_grad():
            for blk, (w, b) in zip(head.blocks, blocks[: 1 if tied else n]):
                blk.weight.copy_(w)
                blk.bias.copy_(b)
            head.out.weight.copy_(sd[f"model.{n}.weight"])
            head.out.bias.copy_(sd[f"model.{n}.bias"])
        meta = {"hidden": hidden, "blocks": n, "tied": tied, "reads": "candidate", "format": "specdec_pp authors (AcceptancePredictionHead)",
                **{k: v for k, v in cfg.items() if k not in ("hidden_size", "num_layers")}}
        return head.eval(), meta


def _half(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Artifacts are stored in float16 (half the size; the draft computes in float32)."""
    return {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous().cpu() for k, v in sd.items()}


def _float(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def soft_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
             w_reject: float = 6.0, w_accept: float = 1.0) -> torch.Tensor:
    """SpecDec++ loss: soft-label BCE with class weights, normalised by the total weight.

    ``labels`` = min(1, p/q) is the probability of acceptance; the accept term is weighted
    ``w_accept * label`` and the reject term ``w_reject * (1 - label)``.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    wa = w_accept * labels * mask
    wr = w_reject * (1 - labels) * mask
    total = (wa + wr).sum().clamp_min(1e-8)
    return -(wa * logp[..., 1] + wr * logp[..., 0]).sum() / total


def param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


