"""Pure compression math: DCT, blocks, top-k, aggregation, packing. No process group."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deto.compress.chunking import block_size, from_blocks, make_layout, to_blocks
from deto.compress.dct import dct_blocks, dct_matrix, idct_blocks
from deto.compress.packing import pack, unpack
from deto.compress.topk import keyed_topk, topk_indices
from deto.compress.wire import (
    WireFormat,
    _pack_spans,
    _pack_words,
    _unpack_spans,
    _unpack_words,
    _word,
    index_bits,
    pack_bits,
    packed_nbytes,
    unpack_bits,
)
from deto.replicators.demo import plan_shard

CPU = torch.device("cpu")


@pytest.mark.parametrize("n", [1, 2, 7, 64, 100])
def test_dct_matrix_is_orthonormal(n):
    d = dct_matrix(n, CPU, torch.float64)
    assert torch.allclose(d @ d.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_dct_matches_the_textbook_definition():
    x = torch.randn(8, dtype=torch.float64)
    n = torch.arange(8, dtype=torch.float64)
    ref = torch.stack([(x * torch.cos(math.pi * (2 * n + 1) * k / 16)).sum() for k in range(8)])
    ref *= math.sqrt(2 / 8)
    ref[0] /= math.sqrt(2)
    assert torch.allclose(dct_blocks(x.view(1, 1, 8)).flatten(), ref)


def test_dct_basis_is_built_once():
    assert dct_matrix(16, CPU, torch.float32) is dct_matrix(16, CPU, torch.float32)


@given(st.integers(1, 300), st.integers(1, 70))
def test_block_size_bounds(n, chunk):
    b = block_size(n, chunk)
    assert 1 <= b <= max(chunk, 1)
    blocks = math.ceil(n / b)
    assert blocks * b - n < blocks  # padding below one element per block
    if n % chunk == 0:
        assert b == min(n, chunk)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=3),
    st.integers(1, 16),
    st.sampled_from(["1d", "2d"]),
)
def test_blocks_round_trip(shape, chunk, mode):
    x = torch.randn(shape, dtype=torch.float64)
    layout = make_layout(x.shape, chunk, mode)
    blocks = to_blocks(x, layout)
    assert (
        blocks.shape == (layout.num_blocks, layout.block_rows, layout.block_cols) or x.numel() == 0
    )
    if x.numel():
        assert torch.equal(from_blocks(blocks, layout), x)
        assert torch.allclose(idct_blocks(dct_blocks(blocks)), blocks, atol=1e-12)


def _topk(coeffs, k):
    idx = topk_indices(coeffs.abs(), k)
    return idx, coeffs.gather(-1, idx)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 300), st.data())
def test_topk_pack_unpack_round_trip(nb, m, data):
    k = data.draw(st.integers(1, m))
    coeffs = torch.randn(nb, m)
    idx, vals = _topk(coeffs, k)
    assert idx.dtype == torch.int64
    # the kept values are the k largest magnitudes of each block
    kept = vals.abs().sort(dim=1, descending=True).values
    assert torch.equal(kept, coeffs.abs().sort(dim=1, descending=True).values[:, :k])
    buffer, specs = pack([idx, vals])
    assert buffer.dtype == torch.uint8 and buffer.numel() == idx.nbytes + vals.nbytes
    idx2, vals2 = unpack(buffer, specs)
    assert torch.equal(idx2, idx) and torch.equal(vals2, vals)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 40), st.integers(2, 200), st.integers(1, 8), st.data())
def test_keyed_topk_is_exact(nb, m, k, data):
    k = min(k, m - 1)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    mag = torch.randn(nb, m, generator=g).abs()
    mag[0] = 0.0  # a row of ties
    if nb > 1:  # values that differ only in their lowest bits
        mag[1] = 1.0 + torch.arange(m) * 2.0**-22
    if nb > 2:
        mag[2] = torch.randint(0, 3, (m,), generator=g).float()  # many exact ties
    keys = torch.empty(nb, m, dtype=torch.int32)
    idx = keyed_topk(mag, k, keys)
    assert idx.shape == (nb, k) and idx.dtype == torch.int64
    assert all(len(set(row)) == k for row in idx.tolist())  # distinct positions
    # the chosen magnitudes are the k largest of every row (ties: any of the equal ones)
    chosen = mag.gather(1, idx).sort(dim=1, descending=True).values
    assert torch.equal(chosen, mag.sort(dim=1, descending=True).values[:, :k])
    assert torch.equal(topk_indices(mag, k, keys).sort(1).values, idx.sort(1).values)
    # signed values rank by magnitude, exactly as their magnitudes do
    signs = torch.randint(0, 2, (nb, m), generator=g).float().mul_(2).sub_(1)
    assert torch.equal(keyed_topk(mag * signs, k, keys), idx)
    plain = mag.topk(k, dim=-1, sorted=False).indices  # magnitudes need no abs pass
    assert torch.equal(topk_indices(mag * signs, k), plain)
    assert torch.equal(topk_indices(mag, k, signed=False), plain)


def test_topk_rejects_bad_k():
    with pytest.raises(ValueError, match="Invalid top-k: 5"):
        topk_indices(torch.ones(2, 4), 5)


def test_index_bits_address_the_whole_block():
    assert [index_bits(m) for m in (1, 2, 3, 64, 65, 1024, 4096, 4097)] == [
        1, 1, 2, 6, 7, 10, 12, 13
    ]
    with pytest.raises(ValueError, match="block size"):
        index_bits(0)
    idx = torch.randperm(4096).view(1, -1)
    packed = pack_bits(idx, index_bits(4096))
    # the top of the range survives
    assert torch.equal(unpack_bits(packed, 12, 4096).view(1, -1), idx)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 31), st.integers(0, 70), st.data())
def test_pack_bits_round_trip_and_size(bits, n, data):
    values = torch.tensor(
        data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n)),
        dtype=torch.int64,
    )
    packed = pack_bits(values, bits)
    assert (
        packed.dtype == torch.uint8
        and packed.numel() == packed_nbytes(n, bits) == math.ceil(n * bits / 8)
    )
    assert torch.equal(unpack_bits(packed, bits, n), values)


@pytest.mark.parametrize("bits", [b for b in range(1, 32) if _word(b)])
def test_word_and_span_packing_write_the_same_stream(bits):
    for n in (0, 1, 7, 33):
        values = torch.randint(0, 2**bits, (n,))
        packed = _pack_spans(values, bits)
        assert torch.equal(_pack_words(values, bits), packed)
        assert torch.equal(_unpack_words(packed, bits, n), _unpack_spans(packed, bits, n))


def test_pack_bits_layout_is_lsb_first():
    # 12-bit 0xABC then 0x123: bytes BC, 3A (low nibble of 0x123 above 0xA), 12
    assert pack_bits(torch.tensor([0xABC, 0x123]), 12).tolist() == [0xBC, 0x3A, 0x12]


def test_pack_bits_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="fit in 4"):
        pack_bits(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="fit in 4"):
        pack_bits(torch.tensor([-1]), 4)
    with pytest.raises(ValueError, match="bit width"):
        pack_bits(torch.tensor([1]), 0)
    with pytest.raises(ValueError, match="does not hold"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 12, 2)


@pytest.mark.parametrize("values", ["fp32", "bf16", "int8", "int4", "int2", "sign"])
def test_wire_format_round_trip_and_exact_size(values):
    wire = WireFormat(values)
    g = torch.Generator().manual_seed(0)
    coeffs = torch.randn(7, 4096, generator=g)
    coeffs[3] = 0.0  # an all-zero block: int8's scale must not divide by zero
    idx, vals = _topk(coeffs, 32)
    parts = wire.encode(idx, vals, 4096)
    assert len(parts) == wire.parts and sum(p.nbytes for p in parts) == wire.nbytes(7, 32, 4096)
    got_idx, got = wire.decode(parts, 7, 32, 4096, torch.float32)
    assert torch.equal(got_idx, idx)
    assert torch.equal(got, wire.round_trip(vals))  # the sender's error feedback sees the same
    err = (got - vals).abs()
    if values == "fp32":
        assert torch.equal(got, vals)
    elif values == "bf16":
        assert torch.equal(got, vals.to(torch.bfloat16).float())
    elif values == "sign":
        scale = vals.abs().mean(dim=1, keepdim=True)
        assert torch.equal(got, torch.where(vals < 0, -scale, scale))
        assert not got[3].any()
    else:
        peak = vals.abs().amax(dim=1, keepdim=True)
        step = {"int8": peak / 127, "int4": peak / 7, "int2": peak * 2 / 3}[values]  # level gap
        assert bool((err <= step / 2 + 1e-6 * peak).all()) and not got[3].any()
        assert torch.equal(got.abs().amax(dim=1), vals.abs().amax(dim=1))  # the largest is exact
        if values == "int2":  # four levels per block
            levels = (3 * got / peak.clamp_min(1e-30)).round().unique()
            assert set(levels.tolist()) <= {-3.0, -1.0, 0.0, 1.0, 3.0}
        if values == "int4":  # 15 levels per block
            levels = (7 * got / peak.clamp_min(1e-30)).round().unique()
            assert set(levels.tolist()) <= set(map(float, range(-7, 8)))


def test_wire_format_sizes_and_bad_input():
    assert WireFormat("fp32").nbytes(2, 32, 4096) == 96 + 256  # 12-bit indices, 4-byte values
    assert WireFormat("bf16").nbytes(2, 32, 4096) == 96 + 128
    assert WireFormat("int8").nbytes(2, 32, 4096) == 96 + 64 + 8
    assert WireFormat("int4").nbytes(2, 32, 4096) == 96 + 32 + 8  # 4 bits a value
    assert WireFormat("int2").nbytes(2, 32, 4096) == 96 + 16 + 8  # 2 bits a value
    assert WireFormat("sign").nbytes(2, 32, 4096) == 96 + 8 + 8  # 1 bit a value
    assert WireFormat("sign").nbytes(1, 3, 64) == 3 + 1 + 4  # 18 index bits, 3 sign bits
    with pytest.raises(ValueError, match="Invalid values"):
        WireFormat("fp8")
    with pytest.raises(ValueError, match="3 parts"):
        WireFormat("int8").decode([torch.zeros(1, dtype=torch.uint8)], 1, 1, 2, torch.float32)


def test_unpack_rejects_wrong_size():
    buffer, specs = pack([torch.zeros(3)])
    with pytest.raises(ValueError, match="12"):
        unpack(buffer[:-1], specs)


def test_plan_keeps_the_compression_rate_and_never_sends_more_than_dense():
    fp32 = WireFormat("fp32")
    big = plan_shard((256, 256), topk=32, chunk=64, blocks="2d", wire=fp32)
    assert (big.layout.block_rows, big.layout.block_cols, big.k) == (64, 64, 32)
    odd = plan_shard((130, 70), topk=32, chunk=64, blocks="2d", wire=fp32)
    assert odd.layout.block_rows == 44 and odd.layout.block_cols == 35  # padding, not collapse
    assert odd.k == round(32 * 44 * 35 / 4096)
    tiny = plan_shard((1,), topk=32, chunk=64, blocks="2d", wire=fp32)
    assert tiny.k == 0  # dense: 1 index + 1 value would exceed 4 bytes
    forced = plan_shard((1,), topk=32, chunk=64, blocks="2d", wire=fp32, dense_fallback=False)
    assert forced.k == 1
    for shape in [(3,), (17, 5), (1000,), (64, 3, 3)]:
        plan = plan_shard(shape, topk=32, chunk=64, blocks="2d", wire=fp32)
        if plan.k:
            sent = fp32.nbytes(plan.layout.num_blocks, plan.k, plan.layout.block_numel)
            assert sent < plan.layout.numel * 4
