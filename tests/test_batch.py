"""PackedBatch: construction, unpad / pad, derived quantities and its errors."""
import pytest
import torch
from hypothesis import given, strategies as st

from embedkit import PackedBatch


def test_from_lengths():
    b = PackedBatch.from_lengths([3, 1, 4])
    assert b.cu_seqlens.dtype == torch.int32
    assert b.cu_seqlens.tolist() == [0, 3, 4, 8]
    assert b.max_seqlen == 4 and b.batch_size == 3 and b.total_tokens == 8
    assert b.lengths.tolist() == [3, 1, 4]
    assert b.seq_ids().tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert b.positions().tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=8).filter(lambda l: max(l) > 0),
       left=st.booleans(), width=st.integers(1, 3))
def test_unpad_pad_round_trip(lengths, left, width):
    L = max(lengths) + 2
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            mask[i, L - n:] = 1
        else:
            mask[i, :n] = 1
    padded = torch.randn(len(lengths), L, width) * mask[..., None]
    packed, batch = PackedBatch.from_padded(padded, mask)
    assert packed.shape == (sum(lengths), width)
    assert batch.lengths.tolist() == lengths
    assert torch.equal(batch.pad(packed), padded)
    assert torch.equal(batch.attention_mask(), mask.bool())
    # Token order inside each sequence is preserved.
    for i, n in enumerate(lengths):
        seq = packed[int(batch.cu_seqlens[i]):int(batch.cu_seqlens[i + 1])]
        assert torch.equal(seq, padded[i][mask[i].bool()])


def test_pad_from_lengths_is_right_padded():
    b = PackedBatch.from_lengths([2, 3])
    x = torch.arange(5.0)
    assert b.pad(x, padding_value=-1).tolist() == [[0, 1, -1], [2, 3, 4]]
    assert torch.equal(b.unpad(b.pad(x)), x)


def test_optional_fields():
    pos3 = torch.zeros(3, 5, dtype=torch.long)
    b = PackedBatch.from_lengths([2, 3], position_ids=pos3, modality_ids=torch.zeros(5, dtype=torch.long),
                                 pool_mask=torch.ones(5, dtype=torch.bool))
    assert b.positions() is pos3
    moved = b.to("cpu")
    assert torch.equal(moved.cu_seqlens, b.cu_seqlens)


@pytest.mark.parametrize("cu, match", [
    (torch.tensor([0, 2, 5], dtype=torch.int64), "cu_seqlens must have dtype"),
    (torch.tensor([1, 2, 5], dtype=torch.int32), r"cu_seqlens\[0\] must be 0"),
    (torch.tensor([0, 3, 2], dtype=torch.int32), "non-decreasing"),
    (torch.tensor([0], dtype=torch.int32), "at least 2 entries"),
    (torch.tensor([[0, 2]], dtype=torch.int32), "cu_seqlens must be 1-D"),
])
def test_bad_cu_seqlens(cu, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PackedBatch(cu)


def test_mismatched_lengths_and_devices():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"position_ids must have shape \[T\] or \[3, T\] with T = 5"):
        PackedBatch(cu, position_ids=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"position_ids must have shape"):
        PackedBatch(cu, position_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="modality_ids must have T = 5"):
        PackedBatch(cu, modality_ids=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="pool_mask must have T = 5"):
        PackedBatch(cu, pool_mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="pool_mask must have dtype"):
        PackedBatch(cu, pool_mask=torch.ones(5))
    with pytest.raises(ValueError, match="max_seqlen = 2 is below the longest sequence"):
        PackedBatch(cu, max_seqlen=2)
    with pytest.raises(ValueError, match="mixed devices"):
        PackedBatch(cu, pool_mask=torch.ones(5, dtype=torch.bool, device="meta"))
    b = PackedBatch(cu)
    with pytest.raises(ValueError, match=r"padded must have shape \[B=2, L=3"):
        b.unpad(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="packed must have T = 5 rows"):
        b.pad(torch.zeros(4, 2))


def test_bad_lengths_and_masks():
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        PackedBatch.from_lengths([2, -1])
    with pytest.raises(TypeError, match="lengths must be integers"):
        PackedBatch.from_lengths([2.5])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        PackedBatch.from_lengths([])
    with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
        PackedBatch.from_attention_mask(torch.ones(2, 3))
    with pytest.raises(ValueError, match="attention_mask must be 2-D"):
        PackedBatch.from_attention_mask(torch.ones(3, dtype=torch.long))


@pytest.mark.parametrize("build", ["mask", "lengths"])
def test_unpad_pad_never_fall_back_from_a_named_backend(build):
    """unpad / pad dispatch through ops.pack / unpack: a backend without pack ("triton") raises as
    ops.pack does, instead of silently running torch indexing."""
    import embedkit
    from embedkit.ops import reference

    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    b = PackedBatch.from_attention_mask(mask) if build == "mask" else PackedBatch.from_lengths([3, 1])
    padded = torch.randn(2, 3, 4)
    packed = torch.randn(4, 4)
    with embedkit.use_backend("triton"):
        with pytest.raises(embedkit.BackendUnavailableError, match="no 'triton' implementation of pack"):
            b.unpad(padded)
        with pytest.raises(embedkit.BackendUnavailableError, match="no 'triton' implementation of unpack"):
            b.pad(packed)
    calls = []
    real_pack, real_unpack = reference.pack, reference.unpack
    try:
        reference.pack = lambda *a: calls.append("pack") or real_pack(*a)
        reference.unpack = lambda *a: calls.append("unpack") or real_unpack(*a)
        with embedkit.use_backend("reference"):
            out = b.unpad(padded)
            back = b.pad(out)
    finally:
        reference.pack, reference.unpack = real_pack, real_unpack
    assert calls == ["pack", "unpack"]  # one dispatch, in the op: none of PackedBatch's own
    keep = b.attention_mask()
    assert torch.equal(out, padded[keep]) and torch.equal(back[keep], out) and not back[~keep].any()


def test_hand_made_token_indices_must_be_increasing():
    b = PackedBatch(torch.tensor([0, 1, 3], dtype=torch.int32), token_indices=torch.tensor([1, 3, 2]),
                    padded_len=2)
    with pytest.raises(ValueError, match="token_indices must be increasing"):
        b.pad(torch.arange(3))
