"""reference.py holds the pure-torch oracles only: production helpers live with the ops that own
them, and the one-process NCE oracle agrees with the op's own composition of the directions."""
import pytest
import torch

import embedkit
from embedkit.ops import _distributed, _varlen, fingerprint, nce, reference


def test_production_helpers_left_the_oracle_module():
    for name in ("nce_combine", "all_gather_with_grad", "fingerprint_rows", "_AllGather", "_gather_rows"):
        assert not hasattr(reference, name), name
    assert callable(nce.nce_combine) and callable(_distributed.all_gather_with_grad)
    assert callable(fingerprint.fingerprint_rows)
    assert fingerprint.TOKEN_ID_DTYPES == reference.TOKEN_ID_DTYPES


@pytest.mark.parametrize("cu", [[0, 3, 3, 7], [0, 7], [0, 0, 2, 7]])
def test_varlen_helpers_match_the_oracle(cu):
    cu = torch.tensor(cu, dtype=torch.int32)
    seg = _varlen.segment_ids(cu, 7)
    assert torch.equal(seg, reference.segment_ids(cu, 7))
    pos = _varlen.positions_in_sequence(cu, 7)
    assert torch.equal(pos, torch.arange(7) - cu.long()[seg])
    assert torch.equal(_varlen.positions_in_sequence(cu, 7, seg), pos)


@pytest.mark.parametrize("options", [
    {}, {"symmetric": True}, {"negatives": "own"}, {"negatives": "shared", "shared_negatives": True},
    {"mrl_dims": [4, 8], "mrl_weights": [0.5, 1.0], "reduction": "none"}, {"ids": True, "reduction": "sum"},
])
def test_one_process_nce_oracle_matches_the_op(options):
    gen = torch.Generator().manual_seed(3)
    query, target = torch.randn(6, 8, generator=gen, dtype=torch.float64), torch.randn(6, 8, generator=gen,
                                                                                       dtype=torch.float64)
    kwargs = dict(options)
    if kwargs.pop("negatives", None):
        kwargs["negatives"] = torch.randn(6, 2, 8, generator=gen, dtype=torch.float64)
    if kwargs.pop("ids", False):
        kwargs["query_ids"] = torch.tensor([0, 1, 1, 2, 3, 3])
    with embedkit.use_backend("reference"):
        op = embedkit.nce_loss(query, target, temperature=0.1, **kwargs)
    torch.testing.assert_close(reference.nce_loss(query, target, temperature=0.1, **kwargs), op, rtol=0, atol=0)
