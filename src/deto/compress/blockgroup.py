"""DeMo's decoupled momentum for shards that share a block shape, kept in the DCT domain.

The DCT is linear and orthonormal, so ``DCT(decay * delta + lr * grad)`` is
``decay * DCT(delta) + lr * DCT(grad)``, and removing what was sent from ``delta`` (the inverse
DCT of the sent coefficients) removes exactly those coefficients from ``DCT(delta)``. Keeping
the momentum as coefficients therefore does the reference's step with one forward transform
(the gradient's) and one inverse transform (the aggregate's) instead of three, and error
feedback becomes a sparse write. A block that overhangs its shard (zero padding) is the one
exception: the reference drops the padded part of what was sent, so those blocks get that part
transformed back (:meth:`BlockGroup._restore_padding`), keeping the two exactly equivalent in
exact arithmetic. In floating point the momentum is reassociated, so it agrees with the
parameter-space math to rounding, not bit for bit; decoding is unaffected (every node decodes
the same bytes with the same ops).

Coefficients live in a blocked row-major layout: a shard of ``rows x cols`` padded to
``(g0 * b0) x (g1 * b1)`` keeps coefficient ``(u, v)`` of block ``(i, j)`` at row ``i * b0 + u``
and column ``j * b1 + v``. Both transforms then run on the shard's own layout, as one matrix
product per dimension, with no blocking copies. Workspaces are allocated once; the aggregate
buffer is kept all-zero between steps by clearing only the entries written.

With ``transform="none"`` the transform matrices are the identity: the same code then keeps
the momentum (or a pseudo-gradient's error feedback) as the tensor's own values and selects
the top-k of each block of them (SparseLoCo's chunked top-k), at the cost of products with an
identity matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deto.compress.chunking import BlockLayout, from_blocks, to_blocks
from deto.compress.dct import Transform, transform_matrix
from deto.compress.topk import Aggregation, topk_indices
from deto.compress.wire import WireFormat


@dataclass(frozen=True)
class Member:
    """One shard of a group: its layout and where its coefficients and blocks start."""

    layout: BlockLayout
    offset: int  # first element of its region in the group's buffers
    first_block: int  # its first block in the group's block order (row-major over the grid)

    @property
    def padded(self) -> tuple[int, int]:
        g0, g1 = self.layout.grid
        return g0 * self.layout.block_rows, g1 * self.layout.block_cols

    @property
    def padded_numel(self) -> int:
        r, c = self.padded
        return r * c

    @property
    def has_padding(self) -> bool:
        return self.padded != (self.layout.rows, self.layout.cols)


class _Views:
    """A member's views of the group buffers, made once (a step then only does arithmetic)."""

    def __init__(self, group: BlockGroup, m: Member) -> None:
        (r, c), (g0, g1) = m.padded, m.layout.grid
        b0, b1 = group.b0, group.b1
        part = slice(m.offset, m.offset + m.padded_numel)
        self.coeffs_rows = group.coeffs[part].view(-1, b1)  # (r * g1, b1): one product per row
        self.coeffs_3d = group.coeffs[part].view(g0, b0, c)  # (g0, b0, c): the column product
        self.coeffs_blocks = group.coeffs[part].view(g0, b0, g1, b1).transpose(1, 2)
        self.scratch_rows = group._scratch[part].view(-1, b1)
        self.scratch_3d = group._scratch[part].view(g0, b0, c)
        self.aggregate_rows = group._aggregate[part].view(-1, b1)
        self.out_rows = group._out[part].view(-1, b1)
        self.out_3d = group._out[part].view(g0, b0, c)
        self.dr = group.dr.expand(g0, b0, b0)
        self.dr_t = group.dr.T.expand(g0, b0, b0)
        out = group._out[part].view(r, c)
        self.result = (
            out.view(m.layout.shape) if not m.has_padding else out[: m.layout.rows, : m.layout.cols]
        )
        device = group.coeffs.device
        self.pad = torch.zeros(r, c, device=device) if m.has_padding else None
        # overhanging blocks (grid positions) and their padded elements
        self.edge = _edge_blocks(m.layout).to(device)
        self.edge_mask = _padding_mask(m.layout, self.edge)


class BlockGroup:
    """The DCT-domain momentum and workspaces of shards cut into ``b0 x b1`` blocks, top ``k``.

    Args:
        layouts: the members' block layouts (same block shape, at least one block each).
        k: coefficients kept per block.
        device: where the buffers live.
        transform: each block's transform before its top-k (the DCT, or none).
    """

    def __init__(
        self,
        layouts: list[BlockLayout],
        k: int,
        device: torch.device,
        transform: Transform = "dct",
    ) -> None:
        shapes = {(lay.block_rows, lay.block_cols) for lay in layouts}
        if len(shapes) != 1 or any(lay.num_blocks == 0 for lay in layouts):
            raise ValueError(
                f"A block group needs non-empty layouts of one block shape, got {shapes}"
            )
        (self.b0, self.b1), self.k = shapes.pop(), k
        self.m = self.b0 * self.b1
        self.members: list[Member] = []
        offset = first = 0
        for lay in layouts:
            member = Member(lay, offset, first)
            self.members.append(member)
            offset += member.padded_numel
            first += lay.num_blocks
        self.numel, self.num_blocks = offset, first
        self.dr = transform_matrix(transform, self.b0, device, torch.float32)
        self.dc = transform_matrix(transform, self.b1, device, torch.float32)
        # the momentum (state) and the reused workspaces
        self.coeffs = torch.zeros(self.numel, device=device)
        self._scratch = torch.empty(self.numel, device=device)  # column products, magnitudes
        self._aggregate = torch.zeros(self.numel, device=device)  # all-zero between steps
        self._count = torch.zeros(self.numel, dtype=torch.int32, device=device)  # senders, kept so
        self._out = torch.empty(self.numel, device=device)  # decoded updates; top-k keys
        self._views = [_Views(self, m) for m in self.members]
        self._all = list(range(len(self.members)))
        # flat position of coefficient (0, 0) of every block, and the row stride of its member
        base, stride = [], []
        for m in self.members:
            g0, g1 = m.layout.grid
            cp = m.padded[1]
            rows = torch.arange(g0, dtype=torch.int64).mul_(self.b0 * cp).unsqueeze(1)
            cols = torch.arange(g1, dtype=torch.int64).mul_(self.b1).unsqueeze(0)
            base.append((rows + cols).reshape(-1) + m.offset)
            stride.append(torch.full((g0 * g1,), cp, dtype=torch.int64))
        self._base = torch.cat(base).to(device)
        self._stride = torch.cat(stride).to(device)
        self._starts: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- views ------------------------------------------------------------------------------
    def region(self, i: int) -> torch.Tensor:
        """Member ``i``'s coefficients, as its padded ``rows x cols`` matrix (a view)."""
        m = self.members[i]
        return self.coeffs[m.offset : m.offset + m.padded_numel].view(m.padded)

    def _block_starts(self, present: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat position of coefficient (0, 0) of every block of the members ``present``, and
        the row stride of its member: ``(blocks, 1)`` each, cached per subset."""
        key = tuple(present)
        if key not in self._starts:
            blocks = torch.cat(
                [
                    torch.arange(
                        self.members[i].first_block,
                        self.members[i].first_block + self.members[i].layout.num_blocks,
                    )
                    for i in present
                ]
            ).to(self._base.device)
            self._starts[key] = (self._base[blocks].unsqueeze(1), self._stride[blocks].unsqueeze(1))
        return self._starts[key]

    def flat_index(self, present: list[int], indices: torch.Tensor) -> torch.Tensor:
        """Flat positions in the group buffers of the members' block-local ``(blocks, k)``
        coefficient ``indices``."""
        base, stride = self._block_starts(present)
        if self.b0 == 1:
            return (base + indices).view(-1)
        rows = torch.div(indices, self.b1, rounding_mode="floor")
        return (base + rows * stride + (indices - rows * self.b1)).view(-1)

    # -- the step ---------------------------------------------------------------------------
    def accumulate(
        self, present: list[int], grads: list[torch.Tensor], lrs: list[float], decay: float
    ) -> None:
        """``coeffs <- decay * coeffs + lr * DCT(grad)`` for the members ``present``."""
        for i, grad, lr in zip(present, grads, lrs, strict=True):
            m, v = self.members[i], self._views[i]
            x = grad.reshape(m.layout.rows, m.layout.cols)
            if v.pad is not None:
                v.pad[: m.layout.rows, : m.layout.cols].copy_(x)
                x = v.pad
            elif x.dtype != torch.float32:
                x = x.float()
            if self.b0 == 1:  # one matrix product, with the momentum update fused in
                v.coeffs_rows.addmm_(x.reshape(-1, self.b1), self.dc.T, beta=decay, alpha=lr)
            else:
                torch.mm(x.reshape(-1, self.b1), self.dc.T, out=v.scratch_rows)
                v.coeffs_3d.baddbmm_(v.dr, v.scratch_3d, beta=decay, alpha=lr)

    def magnitudes(self, present: list[int]) -> torch.Tensor:
        """``|coeffs|`` of the members ``present`` as ``(blocks, b0 * b1)``, in block order."""
        start = 0
        for i in present:
            (g0, g1), n = self.members[i].layout.grid, self.members[i].layout.num_blocks
            dst = self._scratch[start * self.m : (start + n) * self.m]
            torch.abs(self._views[i].coeffs_blocks, out=dst.view(g0, g1, self.b0, self.b1))
            start += n
        return self._scratch[: start * self.m].view(start, self.m)

    def select(
        self, present: list[int], wire: WireFormat
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Top-k of each block of the members ``present``, with error feedback.

        Returns ``(indices, values, encoded)``: ``(blocks, k)`` block-local indices and the
        values, and the values as :meth:`WireFormat.encode_values` puts them on the wire. What
        the receivers will read for them (:meth:`WireFormat.send_values`) leaves the momentum.
        """
        if self.b0 == 1 and present == self._all:  # 1-D blocks are already in block order
            ranked, signed = self.coeffs.view(-1, self.m), True
        else:  # blocked by a copy, which may as well be of the magnitudes
            ranked, signed = self.magnitudes(present), False
        scratch = self._out.view(torch.int32)[: ranked.numel()]  # keys or magnitudes
        indices = topk_indices(ranked, self.k, scratch, signed=signed)
        flat = self.flat_index(present, indices)
        values = self.coeffs.index_select(0, flat).view_as(indices)
        encoded, sent = wire.send_values(values)
        self.coeffs.index_copy_(0, flat, (values - sent).view(-1))
        if any(self._views[i].pad is not None for i in present):
            self._restore_padding(present, indices, sent)
        return indices, values, encoded

    def _restore_padding(
        self, present: list[int], indices: torch.Tensor, sent: torch.Tensor
    ) -> None:
        """Put back into overhanging blocks the padded part of what was sent.

        The parameter-space momentum has no padding, so subtracting what was sent there drops
        the part of its inverse DCT that falls in the padding: ``DCT(pad_mask * IDCT(sent))``
        stays in the momentum.
        """
        start = 0
        for i in present:
            m, v = self.members[i], self._views[i]
            if m.has_padding:
                rows = start + v.edge[:, 0] * m.layout.grid[1] + v.edge[:, 1]
                dense = torch.zeros(len(v.edge), self.m, device=sent.device)
                dense.scatter_(1, indices[rows], sent[rows])
                spatial = self.dr.T @ dense.view(-1, self.b0, self.b1) @ self.dc
                back = self.dr @ spatial.mul_(v.edge_mask) @ self.dc.T
                v.coeffs_blocks.index_put_((v.edge[:, 0], v.edge[:, 1]), back, accumulate=True)
            start += m.layout.num_blocks

    def decode(
        self,
        present: list[int],
        received: list[tuple[torch.Tensor, torch.Tensor]],
        mode: Aggregation,
    ) -> list[torch.Tensor]:
        """Aggregate every node's ``(indices, values)`` and inverse-DCT them, per member.

        Each node's entries are added into one all-zero buffer, in node order (indices are
        distinct within a node, so no two writes race): the same sums as adding the nodes'
        dense coefficient blocks, bitwise, and the same on every node. ``selected`` divides
        each value by how many nodes sent that coefficient, ``all`` by the number of nodes.
        Returns views into a workspace that the next call overwrites.
        """
        flats = [self.flat_index(present, idx) for idx, _ in received]
        values = [v.reshape(-1) for _, v in received]
        # writing zeros where the nodes wrote beats clearing a buffer only while they wrote
        # to a small part of it
        sparse = len(received) * self.k * 16 <= self.m
        if mode == "selected":
            ones = torch.ones(values[0].shape, dtype=self._count.dtype, device=self._count.device)
            for flat in flats:
                self._count.scatter_add_(0, flat, ones)
            scaled = [
                v / self._count.index_select(0, f) for f, v in zip(flats, values, strict=True)
            ]
            _clear(self._count, flats, sparse)
        else:
            scaled = [v / len(values) for v in values]
        for flat, v in zip(flats, scaled, strict=True):
            self._aggregate.scatter_add_(0, flat, v)
        if self.b0 == 1 and present == self._all:  # one product for the whole group
            torch.mm(self._aggregate.view(-1, self.b1), self.dc, out=self._out.view(-1, self.b1))
        else:
            for i in present:
                self._inverse(i)
        _clear(self._aggregate, flats, sparse)
        return [self._result(i) for i in present]

    def _inverse(self, i: int) -> None:
        """Inverse DCT of member ``i``'s aggregate into its part of the output workspace."""
        v = self._views[i]
        if self.b0 == 1:
            torch.mm(v.aggregate_rows, self.dc, out=v.out_rows)
        else:
            torch.mm(v.aggregate_rows, self.dc, out=v.scratch_rows)
            torch.bmm(v.dr_t, v.scratch_3d, out=v.out_3d)

    def _result(self, i: int) -> torch.Tensor:
        """Member ``i``'s decoded update in its shard's shape (a view unless padded)."""
        m, v = self.members[i], self._views[i]
        return v.result if not m.has_padding else v.result.reshape(m.layout.shape)

    def momentum(self, i: int) -> torch.Tensor:
        """Member ``i``'s momentum in parameter space (an inverse transform; for inspection)."""
        m = self.members[i]
        (r, c), lay = m.padded, m.layout
        padded = BlockLayout((r, c), r, c, self.b0, self.b1)
        blocks = to_blocks(self.region(i), padded) @ self.dc
        if self.b0 > 1:
            blocks = self.dr.T @ blocks
        spatial = from_blocks(blocks, padded)
        return spatial[: lay.rows, : lay.cols].reshape(lay.shape)


def _clear(buffer: torch.Tensor, written: list[torch.Tensor], sparse: bool) -> None:
    """Make ``buffer`` all-zero again after writes at the positions ``written``."""
    if sparse:
        for flat in written:
            buffer.index_fill_(0, flat, 0)
    else:
        buffer.zero_()


def _edge_blocks(layout: BlockLayout) -> torch.Tensor:
    """``(n, 2)`` grid positions of the blocks that overhang the shard (last row or column)."""
    g0, g1 = layout.grid
    pad_r = g0 * layout.block_rows > layout.rows
    pad_c = g1 * layout.block_cols > layout.cols
    cells = {(i, g1 - 1) for i in range(g0)} if pad_c else set()
    if pad_r:
        cells |= {(g0 - 1, j) for j in range(g1)}
    return torch.tensor(sorted(cells), dtype=torch.int64).view(-1, 2)


def _padding_mask(layout: BlockLayout, edge: torch.Tensor) -> torch.Tensor:
    """1 on the padded elements of each edge block, 0 on the shard's own elements."""
    b0, b1 = layout.block_rows, layout.block_cols
    u = torch.arange(b0, device=edge.device).view(1, b0, 1) + edge[:, 0].view(-1, 1, 1) * b0
    v = torch.arange(b1, device=edge.device).view(1, 1, b1) + edge[:, 1].view(-1, 1, 1) * b1
    return ((u >= layout.rows) | (v >= layout.cols)).float()
