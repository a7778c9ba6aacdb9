"""The bytes DeMo puts on the wire for a group of blocks: bit-packed indices and coded values.

Indices address one of ``m`` coefficients of a block, so ``ceil(log2 m)`` bits each is enough
(12 for a 64 x 64 block, where a whole byte type would spend 16). Values travel as fp32, bf16,
or with one fp32 scale per block as int8, int4, 2-bit levels or 1-bit signs
(:class:`WireFormat`).
Every node decodes the same gathered bytes
with the same ops, so what a node reads back is bitwise what every other node reads back; the
sender uses :meth:`WireFormat.round_trip` to subtract exactly that from its momentum.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

VALUE_CODECS = ("fp32", "bf16", "int8", "int4", "int2", "sign")
INT8_MAX = 127
INT4_MAX = 7


def index_bits(block_numel: int) -> int:
    """Bits that address positions ``0 .. block_numel - 1`` (at least one)."""
    if block_numel < 1:
        raise ValueError(f"Invalid block size: {block_numel}")
    return max(1, (block_numel - 1).bit_length())


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that :func:`pack_bits` uses for ``count`` values of ``bits`` bits."""
    return math.ceil(count * bits / 8)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers below ``2**bits`` into a ``uint8`` stream, least significant
    bit first; value ``i`` starts at bit ``i * bits``. The inverse is :func:`unpack_bits`.

    Widths whose values tile whole bytes within 64 bits (6 bits: 4 values in 3 bytes; 10, 12,
    any width up to 8, ...) are packed word by word with dense shifts, in the narrowest integer
    type that holds a word (a byte for 1, 2, 4 and 8 bits); others byte span by byte span. All
    write the same stream.
    """
    if not 1 <= bits <= 31:
        raise ValueError(f"Invalid bit width: {bits} (expected 1..31)")
    flat = values.reshape(-1).to(torch.int64)
    if bool((flat >> bits).any()):  # negative or too wide; one host sync on an accelerator
        raise ValueError(f"values do not fit in {bits} unsigned bits")
    if _word(bits):
        return _pack_words(flat, bits)
    return _pack_spans(flat, bits)


def unpack_bits(buffer: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` ``bits``-bit integers of a :func:`pack_bits` stream, as ``int64``."""
    if buffer.dtype != torch.uint8 or buffer.numel() != packed_nbytes(count, bits):
        raise ValueError(
            f"Buffer of {buffer.numel()} {buffer.dtype} does not hold {count} values of {bits} bits"
        )
    if _word(bits):
        return _unpack_words(buffer, bits, count)
    return _unpack_spans(buffer, bits, count)


def _word(bits: int) -> tuple[int, int] | None:
    """``(values, bytes)`` of the smallest whole-byte run of ``bits``-bit values, if it fits
    in 63 bits (so shifts stay within a signed 64-bit word)."""
    run = math.lcm(bits, 8)
    return (run // bits, run // 8) if run <= 63 else None


@functools.lru_cache(maxsize=32)
def _word_shifts(
    bits: int, device: torch.device
) -> tuple[torch.dtype, torch.Tensor, torch.Tensor]:
    """The integer type of a packed word of ``bits``-bit values (the narrowest whose
    non-negative range holds it), and the shifts that take each value and each byte out of it."""
    per_word, nbytes_word = _word(bits)  # type: ignore[misc]
    dtype = torch.uint8 if nbytes_word == 1 else torch.int32 if nbytes_word <= 3 else torch.int64
    values = torch.arange(per_word, device=device).mul_(bits).to(dtype)
    nbytes = torch.arange(nbytes_word, device=device).mul_(8).to(dtype)
    return dtype, values, nbytes


def _pack_words(flat: torch.Tensor, bits: int) -> torch.Tensor:
    per_word, nbytes_word = _word(bits)  # type: ignore[misc]
    dtype, _, byte_shifts = _word_shifts(bits, flat.device)
    count = flat.numel()
    values = torch.nn.functional.pad(flat, (0, -count % per_word)).view(-1, per_word).to(dtype)
    word = values[:, 0].clone()
    for i in range(1, per_word):  # a column at a time: faster than a broadcast shift
        word |= values[:, i] << (i * bits)
    if nbytes_word > 1:
        word = ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8)
    return word.view(-1)[: packed_nbytes(count, bits)]


def _unpack_words(buffer: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    per_word, nbytes_word = _word(bits)  # type: ignore[misc]
    dtype, value_shifts, byte_shifts = _word_shifts(bits, buffer.device)
    groups = -(-count // per_word)
    raw = torch.nn.functional.pad(buffer, (0, groups * nbytes_word - buffer.numel()))
    word = raw.view(groups, nbytes_word).to(dtype)
    if nbytes_word > 1:
        word = (word << byte_shifts).sum(dim=1, dtype=dtype, keepdim=True)
    out = (word >> value_shifts) & ((1 << bits) - 1)
    return out.view(-1)[:count].to(torch.int64)


def _pack_spans(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """Each value split into the (at most ``ceil((bits + 7) / 8)``) bytes it overlaps, the
    pieces added into the stream: neighbouring values' pieces occupy disjoint bits, so integer
    addition is an OR, exact and order-independent on every device."""
    first, shift = _bit_offsets(flat.numel(), bits, flat.device)
    shifted = flat << shift
    nbytes, span = packed_nbytes(flat.numel(), bits), _span(bits)
    out = torch.zeros(nbytes + span, dtype=torch.int64, device=flat.device)
    for j in range(span):
        out.scatter_add_(0, first + j, (shifted >> (8 * j)) & 0xFF)
    return out[:nbytes].to(torch.uint8)


def _unpack_spans(buffer: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    padded = torch.nn.functional.pad(buffer.to(torch.int64), (0, _span(bits)))
    first, shift = _bit_offsets(count, bits, buffer.device)
    word = padded.index_select(0, first)
    for j in range(1, _span(bits)):
        word |= padded.index_select(0, first + j) << (8 * j)
    return (word >> shift) & ((1 << bits) - 1)


@functools.lru_cache(maxsize=32)
def _bit_offsets(count: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """First byte of each of ``count`` packed values, and its bit offset in that byte."""
    offset = torch.arange(count, device=device) * bits
    return offset // 8, offset % 8


def _span(bits: int) -> int:
    """Most bytes one ``bits``-bit value can overlap (it may start at any bit of a byte)."""
    return (bits + 7 + 7) // 8


# bits per value of the codecs that carry one fp32 scale per block
SCALED_BITS = {"int8": 8, "int4": 4, "int2": 2, "sign": 1}


@dataclass(frozen=True)
class WireFormat:
    """Encoding of ``(num_blocks, k)`` top-k indices and values of blocks of ``m`` coefficients.

    ``values``:

    * ``"fp32"``, ``"bf16"``: the values themselves;
    * ``"int8"``: symmetric, ``round(v / s)`` with ``s = absmax / 127`` per block;
    * ``"int4"``: the same with ``s = absmax / 7`` (15 levels), 4 bits each (Streaming DiLoCo
      sends its outer gradients in 4 bits);
    * ``"int2"`` (Templar-style): 4 levels ``(-1, -1/3, 1/3, 1) * s`` with ``s = absmax`` per
      block (the nearest level; the largest value is exact), 2 bits each;
    * ``"sign"`` (Psyche-style): 1 bit each, read back as ``sign(v) * mean |v|`` of the block
      (a zero reads as positive).

    The scaled codecs send one fp32 scale per block; the 4-, 2- and 1-bit codes are bit-packed
    over the whole group like the indices.
    """

    values: str = "fp32"

    def __post_init__(self) -> None:
        if self.values not in VALUE_CODECS:
            raise ValueError(f"Invalid values: {self.values!r} (expected one of {VALUE_CODECS})")

    @property
    def parts(self) -> int:
        """Tensors per encoded group: indices, values (and the scales of scaled codecs)."""
        return 3 if self.values in SCALED_BITS else 2

    def nbytes(self, num_blocks: int, k: int, m: int) -> int:
        """Wire bytes of one group: the exact size of :meth:`encode`'s tensors."""
        return packed_nbytes(num_blocks * k, index_bits(m)) + self.value_nbytes(num_blocks, k)

    def value_nbytes(self, num_blocks: int, k: int) -> int:
        """Wire bytes of ``(num_blocks, k)`` values: the size of :meth:`encode_values`'s."""
        entries = num_blocks * k
        if self.values in SCALED_BITS:
            return packed_nbytes(entries, SCALED_BITS[self.values]) + 4 * num_blocks
        return {"fp32": 4, "bf16": 2}[self.values] * entries

    def encode(self, indices: torch.Tensor, values: torch.Tensor, m: int) -> list[torch.Tensor]:
        """``(num_blocks, k)`` indices and float values -> the tensors to send."""
        return [self.encode_indices(indices, m), *self.encode_values(values)]

    def encode_indices(self, indices: torch.Tensor, m: int) -> torch.Tensor:
        """Block-local indices into blocks of ``m`` coefficients -> their packed bits."""
        return pack_bits(indices, index_bits(m))

    def decode(
        self, parts: list[torch.Tensor], num_blocks: int, k: int, m: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors of :meth:`encode` -> ``(indices int64, values in dtype)``, each
        ``(num_blocks, k)``."""
        if len(parts) != self.parts:
            raise ValueError(f"{self.values} groups have {self.parts} parts, got {len(parts)}")
        indices = unpack_bits(parts[0], index_bits(m), num_blocks * k).view(num_blocks, k)
        return indices, self.decode_values(parts[1:], (num_blocks, k), dtype)

    def round_trip(self, values: torch.Tensor) -> torch.Tensor:
        """What receivers will read for ``values``, in ``values``' dtype (for error feedback)."""
        return self.send_values(values)[1]

    def encode_values(self, values: torch.Tensor) -> list[torch.Tensor]:
        """``(blocks, n)`` float values -> the tensors to send (codes, and scales per block)."""
        return self._pack(self._levels(values))

    def send_values(self, values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """:meth:`encode_values` and :meth:`round_trip` of ``values`` from one quantization;
        the read-back comes from the codes before bit packing, which unpacking restores
        exactly, so it is bitwise what :meth:`decode_values` gives the receivers."""
        levels = self._levels(values)
        shape = (values.shape[0], values.shape[-1])
        return self._pack(levels), self._values(levels, shape, values.dtype)

    def decode_values(
        self, parts: list[torch.Tensor], shape: tuple[int, int], dtype: torch.dtype
    ) -> torch.Tensor:
        """The tensors of :meth:`encode_values` -> the ``shape`` values receivers read."""
        return self._values(self._unpack(parts, shape), shape, dtype)

    def _levels(self, values: torch.Tensor) -> list[torch.Tensor]:
        """What is sent for ``(blocks, n)`` values, before bit packing: the values themselves
        (fp32, bf16), or integer codes (in any dtype) and one scale per block."""
        v = values.float()
        if self.values == "fp32":
            return [v]
        if self.values == "bf16":
            return [values.to(torch.bfloat16)]
        if self.values == "sign":
            return [torch.signbit(v) & (v != 0), v.abs().mean(dim=-1, keepdim=True)]
        # A non-finite value makes its block's scale non-finite, which is what carries it to the
        # receivers (where the optimizer's non-finite check sees it on every node alike); the
        # codes themselves only need to stay in range, so NaN codes become 0.
        peak = v.abs().amax(dim=-1, keepdim=True)
        if self.values in ("int8", "int4"):
            top = INT8_MAX if self.values == "int8" else INT4_MAX
            scale = peak / top
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            codes = torch.round(v / safe).nan_to_num_(0.0).clamp_(-top, top)
            return [codes.to(torch.int8) if self.values == "int8" else codes, scale]
        # int2: level q in 0..3 is (2q - 3) / 3 of the peak; the nearest one
        safe = torch.where(peak > 0, peak, torch.ones_like(peak))
        return [torch.floor(v / safe * 1.5).add_(2).nan_to_num_(0.0).clamp_(0, 3), peak]

    def _pack(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Bit-pack the codes of the sub-byte codecs (int4's shifted to be non-negative)."""
        if self.values not in ("int4", "int2", "sign"):
            return levels
        codes = levels[0] + INT4_MAX if self.values == "int4" else levels[0]
        return [pack_bits(codes, SCALED_BITS[self.values]), levels[1]]

    def _unpack(self, parts: list[torch.Tensor], shape: tuple[int, int]) -> list[torch.Tensor]:
        """Inverse of :meth:`_pack`."""
        if self.values not in ("int4", "int2", "sign"):
            return parts
        codes = unpack_bits(parts[0], SCALED_BITS[self.values], shape[0] * shape[1]).view(shape)
        return [codes - INT4_MAX if self.values == "int4" else codes, parts[1]]

    def _values(
        self, levels: list[torch.Tensor], shape: tuple[int, int], dtype: torch.dtype
    ) -> torch.Tensor:
        """The values that :meth:`_levels`' output stands for (integer codes in any dtype
        give the same floats)."""
        codes = levels[0]
        if self.values in ("int8", "int4"):
            return (codes.to(torch.float32) * levels[1]).to(dtype)
        if self.values == "sign":
            return ((1 - 2 * codes.to(torch.int64)).to(torch.float32) * levels[1]).to(dtype)
        if self.values == "int2":
            return ((2 * codes - 3).to(torch.float32) / 3 * levels[1]).to(dtype)
        return codes.to(dtype).reshape(shape)
