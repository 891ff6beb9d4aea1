"""Weights on transparent huge pages (vlm/hugepages.py): aligned, advised, the same values; a tied head and its
embedding share the one copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlm import hugepages
from vlm.layers.linear import PackedLinear, kernels_take

needs_huge_pages = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages here")


def _mapping(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding `address`."""
    fields, inside = {}, False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(bound, 16) for bound in head.split("-"))
            if inside:
                break
            inside = start <= address < end
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


@needs_huge_pages
def test_large_tensors_are_aligned_and_advised_huge():
    tensor = hugepages.empty((1024, 3000), torch.bfloat16)  # 5.9 MiB: two whole huge pages and a tail
    assert tensor.shape == (1024, 3000) and tensor.dtype == torch.bfloat16 and tensor.is_contiguous()
    assert tensor.data_ptr() % hugepages.HUGE_PAGE == 0
    tensor.fill_(1.5)
    assert _mapping(tensor.data_ptr())["THPeligible"] == "1"  # madvise(MADV_HUGEPAGE) took
    source = torch.randn(1024, 3000)
    assert torch.equal(hugepages.copy(source), source)


def test_small_tensors_are_plain():
    tensor = hugepages.empty((16, 16), torch.float32)
    assert tensor.shape == (16, 16) and tensor.untyped_storage().nbytes() == 16 * 16 * 4


@needs_huge_pages
def test_a_tied_head_and_its_embedding_share_one_copy_on_huge_pages():
    if not kernels_take(torch.float32, torch.device("cpu")):
        pytest.skip("the kernels do not run here: the head is packed for oneDNN")
    embedding = nn.Embedding(4096, 256)  # 4 MiB
    head = nn.Linear(256, 4096, bias=False)
    head.weight = embedding.weight
    packed = PackedLinear(head)
    x = torch.randn(1, 256)
    expected = x @ embedding.weight.detach().t()
    with torch.inference_mode():
        out = packed(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert packed.weight.data_ptr() == embedding.weight.data_ptr()
    assert embedding.weight.data_ptr() % hugepages.HUGE_PAGE == 0 and not embedding.weight.is_inference()
    ids = torch.tensor([[3, 4000]])
    assert torch.equal(embedding(ids)[0, 1], packed.weight[4000])
