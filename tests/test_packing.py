import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rdquant import packing
from rdquant.qtensor import QuantizedWeight


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(packing.SUPPORTED_BITS), rows=st.integers(1, 17), cols=st.integers(1, 37),
       seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8)
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packing.packed_nbytes(rows * cols, bits)
    assert torch.equal(packing.unpack(packed, bits, rows * cols).view(rows, cols), codes)


@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
def test_numpy_and_torch_unpack_agree(bits, monkeypatch):
    # unpack takes numpy for small CPU tensors and torch (byte lanes, or one integer per run) above
    g = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 9, 301, 20000, 140001):
        codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.uint8)
        packed = packing.pack(codes, bits)
        outs = []
        for limit in (0, 1 << 30):  # torch only, numpy only
            monkeypatch.setattr(packing, "_NUMPY_CODES", limit)
            outs.append(packing.unpack(packed, bits, n))
        assert torch.equal(outs[0], codes) and torch.equal(outs[1], codes)


def test_three_bit_packs_eight_codes_in_three_bytes():
    codes = torch.arange(8, dtype=torch.uint8)
    packed = packing.pack(codes, 3)
    assert packed.numel() == 3
    word = int(packed[0]) | int(packed[1]) << 8 | int(packed[2]) << 16
    assert [(word >> (3 * i)) & 7 for i in range(8)] == list(range(8))


def test_pack_rejects_out_of_range_and_bad_sizes():
    with pytest.raises(ValueError):
        packing.pack(torch.tensor([4]), 2)
    with pytest.raises(ValueError):
        packing.unpack(torch.zeros(5, dtype=torch.uint8), 4, 8)
    with pytest.raises(ValueError):
        packing.pack(torch.tensor([1]), 9)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 64, 48])
def test_quantized_weight_packed_round_trip(bits, group_size):
    out_f, in_f = 7, 100  # 100 is ragged for groups of 64 and 48
    n_g = 1 if group_size == -1 else -(-in_f // group_size)
    qw = QuantizedWeight(
        codes=torch.randint(0, 1 << bits, (out_f, in_f), dtype=torch.uint8),
        scales=torch.rand(out_f, n_g).half() + 0.01,
        zeros=torch.randint(0, 1 << bits, (out_f, n_g), dtype=torch.uint8),
        bits=bits, group_size=group_size,
    )
    back = QuantizedWeight.from_packed(qw.packed_state(), (out_f, in_f), bits, group_size)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.dequantize(), qw.dequantize())
