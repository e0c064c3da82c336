"""Decoding a DSI token by token with cached keys and values: what beam search runs at every step.

:class:`IncrementalDecoder` reads the parameters of a :class:`~vitdsi_utils.model.vit.DSIModel`'s
decoder blocks and computes, for the few new tokens of a step only, what the model's full decoder
would compute for the whole prefix (``DSIModel.incremental_decoder`` makes one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class IncrementalDecoder:
    """Decode one token per step for W hypotheses ("beams") of each of B queries, doing each piece of work once.

    The same arithmetic as :meth:`DSIModel.decode` in eval mode (no dropout), computed directly
    from the parameters of the model's ``nn.TransformerDecoderLayer`` blocks (``in_proj_weight``,
    ``out_proj``, ``linear1`` ...), so checkpoints and the state dict are those of the model:

    * the cross-attention keys and values of the P encoder tokens are projected once per query
      and layer, when the decoder is made, and shared by all beams of the query: the W beams
      are W query positions of one attention over the query's tokens (broadcast, never copied);
    * self-attention keys and values are cached per position and layer when a token is decoded,
      so a step runs every block on the W new tokens only; :meth:`reorder` re-points each new
      beam at its parent's cached rows (index bookkeeping: cached keys and values never move,
      and a step gathers the prefix rows of the current beams, one layer at a time).

    ``step(tokens)`` takes the token each beam read last, (B, W), and returns the next-token
    logits (B, W, V); between steps ``reorder(parent)`` selects (and may repeat or drop) beams.
    At most ``max_width`` beams per query (the gather buffer is allocated once for them). ``model`` is a
    ``DSIModel``, typed as its ``nn.Module`` base because ``vit`` imports this module.
    """

    def __init__(self, model: torch.nn.Module, memory: torch.Tensor, max_width: int = 1):
        if model.training:
            raise ValueError("incremental decoding has no dropout: put the model in eval mode first (model.eval())")
        c = model.config
        self.model = model
        self.layers = list(model.decoder.layers)
        for layer in self.layers:
            if not (
                layer.norm_first and layer.self_attn._qkv_same_embed_dim and layer.multihead_attn._qkv_same_embed_dim
            ):
                raise ValueError("IncrementalDecoder expects pre-norm decoder layers with packed in-projections")
        self.B, P, D = memory.shape
        self.H, self.d = c.heads, c.dim // c.heads
        self.max_length, self.max_width = c.max_id_length, max_width
        # cross-attention keys and values of every layer, once per query: (B, H, P, d) each
        self.cross = []
        for layer in self.layers:
            attn = layer.multihead_attn
            kv = F.linear(memory, attn.in_proj_weight[D:], attn.in_proj_bias[D:])  # (B, P, 2D)
            k, v = kv.view(self.B, P, 2, self.H, self.d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, P, d) each
            self.cross.append((k.contiguous(), v.contiguous()))
        # self-attention keys and values of the prefix: position s's of every layer, written once
        # when the token at s is decoded, (layers, 2, N_s, H, d) with N_s = B * (width at step s);
        # rows[s] (B*W,) picks each current hypothesis's row of kv[s]. reorder() updates only rows,
        # the cached keys and values never move
        self.kv: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []
        self._gathered: torch.Tensor | None = None  # (max_length, 2, B*max_width, H, d): one layer's prefix
        self.width = 1  # hypotheses per query that the next step() expects
        self.length = 0  # positions decoded so far

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed the last token of every hypothesis, (B, W) int64; return the next-token logits (B, W, V)."""
        model, B, H, d, t = self.model, self.B, self.H, self.d, self.length
        if tuple(tokens.shape) != (B, self.width):
            raise ValueError(f"expected tokens of shape ({B}, {self.width}), got {tuple(tokens.shape)}")
        if t >= self.max_length:
            raise ValueError(f"the model decodes at most {self.max_length} positions")
        W = self.width
        N, D = B * W, H * d
        if len(self.rows) < t:  # no reorder since the last step: every hypothesis kept its row
            self.rows.append(torch.arange(N, device=tokens.device))
        x = (model.token_embed(tokens) + model.token_pos[:, t]).reshape(N, D)  # (N, D), one new token per beam
        for i, layer in enumerate(self.layers):
            # self-attention: the new token attends to its prefix and itself (causal by construction)
            attn = layer.self_attn
            q, k, v = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias).view(N, 3, H, d).unbind(1)
            if i == 0:  # made here, in the dtype autocast gives the keys
                self.kv.append(k.new_empty(len(self.layers), 2, N, H, d))
                if self._gathered is None:
                    self._gathered = k.new_empty(self.max_length, 2, B * self.max_width, H, d)
            self.kv[t][i, 0], self.kv[t][i, 1] = k, v  # (N, H, d) each
            prefix = self._gathered[: t + 1, :, :N]  # (t+1, 2, N, H, d): this layer's keys and values per hypothesis
            for s in range(t):
                torch.index_select(self.kv[s][i], 1, self.rows[s], out=prefix[s])
            prefix[t, 0], prefix[t, 1] = k, v
            keys, values = prefix.unbind(1)  # (t+1, N, H, d) each
            # one query position: softmax(q.k / sqrt(d)) over the t+1 positions, without a kernel launch per head
            weights = ((keys * q).sum(-1) * d**-0.5).softmax(dim=0)  # (t+1, N, H)
            a = (values * weights[..., None]).sum(0)  # (N, H, d)
            x = x + attn.out_proj(a.reshape(N, D))
            # cross-attention: the W beams of a query are W query positions over its P tokens
            attn = layer.multihead_attn
            q = F.linear(layer.norm2(x), attn.in_proj_weight[:D], attn.in_proj_bias[:D])  # (N, D)
            a = F.scaled_dot_product_attention(q.view(B, W, H, d).transpose(1, 2), *self.cross[i])  # (B, H, W, d)
            x = x + attn.out_proj(a.transpose(1, 2).reshape(N, D))
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm3(x))))  # feed-forward
        self.length = t + 1
        return model.head(model.decoder.norm(x)).view(B, W, -1)  # (B, W, V)

    def reorder(self, parent: torch.Tensor) -> None:
        """Continue hypothesis ``parent[b, j]`` (an index into the W current ones of query b) as new hypothesis j:
        parent (B, W') int64, W' <= max_width may differ from W."""
        B, W = self.B, self.width
        if (
            self.length == 0
            or len(self.rows) != self.length - 1
            or parent.shape[0] != B
            or parent.shape[1] > self.max_width
        ):
            raise ValueError(f"reorder needs one step before it and parents of shape ({B}, <= {self.max_width})")
        flat = (parent + torch.arange(B, device=parent.device)[:, None] * W).reshape(-1)  # (B*W',) current rows
        self.rows = [r[flat] for r in self.rows] + [flat]  # (B*W',) each: rows of kv[s] for the new hypotheses
        self.width = parent.shape[1]
