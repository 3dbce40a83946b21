"""``long_short_attention_shard`` (what context parallelism calls) on a slice of a sequence equals that slice of
the whole-sequence op, for the torch and flex backends (flex: forward only on CPU)."""
import pytest
import torch

from megatron_ls.ops import full_attention, full_attention_at, long_short_attention, long_short_attention_shard
from megatron_ls.ops.checks import window_extension
from megatron_ls.ops.projection import project_causal, project_bidirectional

B, H, N, D = 2, 2, 48, 16


def _inputs(r, padded, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64, generator=g) for _ in range(3))
    logits = torch.randn(B, H, N, r, dtype=torch.float64, generator=g) if r else None
    pad = (torch.rand(B, N, generator=g) < 0.25) if padded else None
    return q, k, v, logits, pad


@pytest.mark.parametrize("backend", ["torch", "flex"])
@pytest.mark.parametrize("causal,window,l,r,start,length", [
    (True, 8, 4, 2, 16, 16), (True, 8, 4, 2, 0, 16), (True, 12, 4, 1, 36, 12), (True, 0, 4, 2, 24, 24),
    (True, 5, 4, 0, 20, 8), (False, 4, 4, 2, 16, 16), (False, 3, 4, 1, 24, 12), (False, 4, 4, 0, 8, 8)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("rule", ["floor", "ceil"])
def test_shard_equals_slice_of_whole(backend, causal, window, l, r, start, length, padded, rule):
    q, k, v, logits, pad = _inputs(r, padded)
    ref = long_short_attention(q, k, v, logits, window=window, causal=causal, segment_len=l if r else None,
                               key_padding_mask=pad, backend="torch", window_extension=rule)
    e = window_extension(window, rule)
    hl = min(start, window - 1 if causal else e) if window else 0
    hr = min(N - start - length, 0 if causal else e) if window else 0
    keys = slice(start - hl, start + length + hr)
    k_glob = v_glob = chunk_valid = None
    if r:
        if causal:
            k_glob, v_glob, chunk_valid = project_causal(k, v, logits, pad, l, num_chunks=N // l)
        else:
            k_glob, v_glob = project_bidirectional(k, v, logits, pad)
    qs = slice(start, start + length)
    if backend == "flex":
        q, k, v = (t.float() for t in (q, k, v))
        k_glob = None if k_glob is None else k_glob.float()
        v_glob = None if v_glob is None else v_glob.float()
    with torch.no_grad():
        out = long_short_attention_shard(
            q[:, :, qs], k[:, :, keys] if window else None, v[:, :, keys] if window else None, k_glob, v_glob,
            window=window, causal=causal, segment_len=l, projection_rank=r,
            key_padding_mask=None if pad is None else pad[:, keys], chunk_valid=chunk_valid,
            query_padding_mask=None if pad is None else pad[:, qs], q_offset=start, halo_left=hl, halo_right=hr,
            backend=backend, window_extension=rule)
    tol = dict(rtol=1e-10, atol=1e-12) if backend == "torch" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.double(), ref[:, :, qs], **tol)


@pytest.mark.parametrize("causal", [True, False])
def test_full_attention_at_equals_slice_of_whole(causal):
    q, k, v, _, pad = _inputs(0, True, seed=3)
    ref = full_attention(q, k, v, causal=causal, key_padding_mask=pad)
    positions = torch.cat([torch.arange(8, 16), torch.arange(40, 48)])
    out = full_attention_at(q[:, :, positions], k, v, query_positions=positions, causal=causal,
                            key_padding_mask=pad, query_padding_mask=pad[:, positions])
    torch.testing.assert_close(out, ref[:, :, positions], rtol=1e-10, atol=1e-12)


def test_shard_rejects_wrong_halo_length():
    q, k, v, _, _ = _inputs(0, False)
    with pytest.raises(ValueError, match="halo_left"):
        long_short_attention_shard(q[:, :, 8:16], k[:, :, :16], v[:, :, :16], None, None, window=4, causal=True,
                                   segment_len=4, projection_rank=0, halo_left=3)
