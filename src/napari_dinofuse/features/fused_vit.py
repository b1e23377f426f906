"""The DINOv3 ViT's inference forward with fewer, larger kernels, built from a loaded transformers model.

transformers' ``DINOv3ViTModel`` stays the loader and the reference; this forward computes the same function
(tested against it) with:

* q, k and v as one matrix product (and the gated MLP's gate and up projections as one);
* the layer scales folded into the output projections (``lambda * (W x + b)`` = ``(lambda W) x + lambda b``);
* RoPE applied to q and k together in three elementwise kernels, with tables that leave the prefix tokens
  (CLS, registers) unrotated, instead of splitting off the prefix and concatenating twice per layer;
* attention through ``scaled_dot_product_attention`` (flash / cuDNN kernels on a GPU).

The weights are folded in fp32 before any cast to bf16, so the folded products lose nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FusedViT(nn.Module):
    """Frozen DINOv3 ViT: (B, 3, H, W) standardised pixels -> (B, (H/16)*(W/16), C) final-normed patch tokens."""

    def __init__(self, model):
        super().__init__()
        from transformers.activations import ACT2FN

        cfg = model.config
        self.config = cfg
        self.patch_size = cfg.patch_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        emb = model.embeddings
        self.patch_embed = _own_copy(emb.patch_embeddings)
        self.prefix = nn.Parameter(torch.cat([emb.cls_token, emb.register_tokens], dim=1).detach().clone())
        self.register_buffer("inv_freq", model.rope_embeddings.inv_freq.detach().clone().float(), persistent=False)
        self.act = ACT2FN[cfg.hidden_act]
        self.gated = bool(cfg.use_gated_mlp)
        self.layers = nn.ModuleList(_FusedLayer(layer, self.gated) for layer in model.model.layer)
        self.norm = _own_copy(model.norm)
        self._rope: dict = {}
        self.eval().requires_grad_(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        _, _, h, w = pixels.shape
        return self.encode(pixels, *self.rope_tables(h // self.patch_size, w // self.patch_size, pixels.device))

    def encode(self, pixels: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The forward with the RoPE tables given: what ``torch.compile`` compiles (a table cache inside the
        compiled code would be guarded on, and its first insertion would force a recompilation)."""
        x = self.patch_embed(pixels.to(self.prefix.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.prefix.expand(x.shape[0], -1, -1), x], dim=1)
        for layer in self.layers:
            x = layer(x, cos, sin, self.num_heads, self.head_dim, self.act)
        return self.norm(x[:, self.prefix.shape[1]:])

    def rope_tables(self, gh: int, gw: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (tokens, 1, 1, D) for every token: the prefix tokens get cos 1, sin 0.

        transformers rotates ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = (-x2, x1)``;
        that is ``x * cos + roll(x, D/2) * s`` with ``s = (-sin1, sin2)``.
        """
        dtype = self.prefix.dtype  # the activations' dtype: q and k keep theirs
        key = (gh, gw, dtype, device)
        if key not in self._rope:
            ys = (torch.arange(gh, dtype=torch.float32, device=device) + 0.5) / gh * 2 - 1
            xs = (torch.arange(gw, dtype=torch.float32, device=device) + 0.5) / gw * 2 - 1
            coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)  # (N, 2) in [-1, 1]
            angles = (2 * math.pi * coords[:, :, None] * self.inv_freq.to(device)[None, None, :]).flatten(1, 2)
            angles = angles.tile(2)  # (N, D)
            half = angles.shape[1] // 2
            sign = torch.cat([-torch.ones(half, device=device), torch.ones(half, device=device)])
            prefix = self.prefix.shape[1]
            cos = torch.cat([torch.ones(prefix, angles.shape[1], device=device), angles.cos()])
            sin = torch.cat([torch.zeros(prefix, angles.shape[1], device=device), angles.sin() * sign])
            self._rope[key] = (cos.to(dtype)[:, None, None, :], sin.to(dtype)[:, None, None, :])
        return self._rope[key]


class _FusedLayer(nn.Module):
    def __init__(self, layer, gated: bool):
        super().__init__()
        att = layer.attention
        self.norm1 = _own_copy(layer.norm1)
        self.qkv = _stacked_linear([att.q_proj, att.k_proj, att.v_proj])
        self.proj = _scaled_linear(att.o_proj, layer.layer_scale1.lambda1)
        self.norm2 = _own_copy(layer.norm2)
        mlp = layer.mlp
        self.up = _stacked_linear([mlp.gate_proj, mlp.up_proj]) if gated else _own_copy(mlp.up_proj)
        self.down = _scaled_linear(mlp.down_proj, layer.layer_scale2.lambda1)
        self.gated = gated

    def forward(self, x, cos, sin, heads: int, head_dim: int, act) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, heads, head_dim)
        qk = qkv[:, :, :2]
        qk = torch.addcmul(qk * cos, qk.roll(head_dim // 2, dims=-1), sin)  # RoPE on q and k at once
        q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(att)
        h = self.up(self.norm2(x))
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = act(gate) * up
        else:
            h = act(h)
        return x + self.down(h)


def _own_copy(module: nn.Module) -> nn.Module:
    """A detached copy (the fused model owns its weights, so the transformers model can be freed)."""
    import copy

    return copy.deepcopy(module)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")  # no random init
    out.weight = nn.Parameter(weight.detach().float().contiguous())
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().float().contiguous())
    return out


def _stacked_linear(layers: list[nn.Linear]) -> nn.Linear:
    """One Linear computing ``cat([l(x) for l in layers], -1)``; missing biases count as zeros."""
    biases = [lin.bias if lin.bias is not None else torch.zeros(lin.out_features) for lin in layers]
    has_bias = any(lin.bias is not None for lin in layers)
    return _linear(torch.cat([lin.weight.float() for lin in layers]),
                   torch.cat([b.float() for b in biases]) if has_bias else None)


def _scaled_linear(layer: nn.Linear, scale: torch.Tensor) -> nn.Linear:
    """``scale * layer(x)`` as one Linear."""
    scale = scale.detach().float()
    return _linear(layer.weight.float() * scale[:, None], None if layer.bias is None else layer.bias.float() * scale)
