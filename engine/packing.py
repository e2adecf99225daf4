"""Prefix-sharing trees packed into one sequence with explicit position ids and a tree attention mask.

A tree is a list of segments, each a token list with the index of its parent segment (-1 for a root). Packing
lays the segments of several trees end to end, parents before children, so that

    position[i]  = depth of token i in its own path (parent's end position + offset in segment)
    allowed[q,k] = k <= q  and  seg[k] is seg[q] or one of its ancestors

and token q attends exactly to the tokens of its own root-to-leaf path: every path's hidden states equal those
of running it alone, while shared prefixes (problem prompt, exposed reference) are computed once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Segment:
    tokens: list[int]
    parent: int = -1  # index of the parent segment within the same tree; -1 = root


@dataclass
class Packed:
    """A packed micro-batch. ``start[t][s]`` is where segment s of tree t begins in the packed sequence."""

    input_ids: torch.Tensor  # [1, N] long
    position_ids: torch.Tensor  # [1, N] long
    seg: torch.Tensor  # [N] long, global segment index of every token
    ancestor: torch.Tensor  # [S, S] bool, ancestor[a, b]: segment b is a or an ancestor of a
    start: list[list[int]]
    length: list[list[int]]

    @property
    def numel(self) -> int:
        return self.input_ids.shape[1]

    def prediction_index(self, tree: int, segment: int, parents: list[int]) -> torch.Tensor:
        """Packed indices of the hidden states that predict segment ``segment``'s tokens: [len] long.

        The first token is predicted from the last token of the parent segment, the others from their
        predecessor in the segment. ``parents`` is that tree's parent list.
        """
        s, n = self.start[tree][segment], self.length[tree][segment]
        p = parents[segment]
        if p < 0:
            raise ValueError("a root segment's first token has no predicting position")
        first = self.start[tree][p] + self.length[tree][p] - 1
        return torch.tensor([first] + list(range(s, s + n - 1)), dtype=torch.long)

    def dense_mask(self, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """Additive mask [1, 1, N, N]: 0 where allowed, dtype-min elsewhere (works with eager and sdpa)."""
        seg = self.seg.to(device)
        n = seg.numel()
        allowed = (
            self.ancestor.to(device)[seg][:, seg] & torch.ones(n, n, dtype=torch.bool, device=device).tril()
        )
        mask = torch.zeros(n, n, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None]

    def block_mask(self, device: torch.device | str):
        """FlexAttention BlockMask of the same mask (needs attn_implementation='flex_attention').

        Built by a compiled ``create_block_mask``: it evaluates the mask tile by tile into [N/128, N/128] block
        tables and never holds the N x N mask (eager ``create_block_mask`` materialises it as int64: 512 MiB at
        N=8192, growing as N^2). Compiled once per process with dynamic sizes: every packed length and segment
        count reuses the graph."""
        seg, anc = self.seg.to(device), self.ancestor.to(device)

        def tree(b, h, q, k):
            return (k <= q) & anc[seg[q], seg[k]]

        n = seg.numel()
        return _compiled_create_block_mask()(tree, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)


_CREATE_BLOCK_MASK = None


def _compiled_create_block_mask():
    """``torch.compile(create_block_mask)``, made once per process (torch's recommended way to compile it)."""
    global _CREATE_BLOCK_MASK
    if _CREATE_BLOCK_MASK is None:
        from torch.nn.attention.flex_attention import create_block_mask

        _CREATE_BLOCK_MASK = torch.compile(create_block_mask, dynamic=True)
    return _CREATE_BLOCK_MASK


def pack(trees: list[list[Segment]]) -> Packed:
    """Pack trees (each a list of Segments, parents listed before children) into one sequence."""
    ids: list[int] = []
    pos: list[int] = []
    seg: list[int] = []
    starts: list[list[int]] = []
    lengths: list[list[int]] = []
    ancestors: list[set[int]] = []
    for tree in trees:
        base = len(ancestors)
        end_pos: list[int] = []  # position id following each segment's last token
        tree_start, tree_len = [], []
        for i, s in enumerate(tree):
            if not s.tokens:
                raise ValueError(f"segment {i} of a tree is empty")
            if s.parent >= i:
                raise ValueError(
                    f"segment {i} has parent {s.parent}: parents must come before their children"
                )
            offset = 0 if s.parent < 0 else end_pos[s.parent]
            anc = {base + i} | (ancestors[base + s.parent] if s.parent >= 0 else set())
            ancestors.append(anc)
            tree_start.append(len(ids))
            tree_len.append(len(s.tokens))
            ids.extend(s.tokens)
            pos.extend(range(offset, offset + len(s.tokens)))
            seg.extend([base + i] * len(s.tokens))
            end_pos.append(offset + len(s.tokens))
        starts.append(tree_start)
        lengths.append(tree_len)
    n_seg = len(ancestors)
    ancestor = torch.zeros(n_seg, n_seg, dtype=torch.bool)
    for a, anc in enumerate(ancestors):
        ancestor[a, list(anc)] = True
    return Packed(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([pos], dtype=torch.long),
        seg=torch.tensor(seg, dtype=torch.long),
        ancestor=ancestor,
        start=starts,
        length=lengths,
    )
