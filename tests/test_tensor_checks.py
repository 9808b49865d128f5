"""Specification of tensor_checks.py: each kind of bad tensor refused with a one-line reason, keys and totals
checked, metadata read before any value."""

import pytest
import torch
import torch.nn as nn

from potara_guards.tensor_checks import MAX_NUMEL, AdapterError, check_tensor, check_tensors


def _shrunk_storage():
    t = torch.ones(12).view(3, 4)
    t.untyped_storage().resize_(8)  # the view now addresses 48 bytes of an 8-byte storage
    return t


class _Sub(torch.Tensor):
    pass


def test_check_tensor_refuses_each_kind_of_bad_tensor_with_a_one_line_reason():
    like = torch.zeros(3, 4)
    cases = {
        "not a tensor": ([[0.0] * 4] * 3, "is a list, not a tensor"),
        "subclass": (torch.zeros(3, 4).as_subclass(_Sub), "is a _Sub, not a tensor"),
        "sparse": (torch.zeros(3, 4).to_sparse(), "not a dense strided tensor .*sparse_coo"),
        "nested": (torch.nested.nested_tensor([torch.zeros(4)] * 3), "nested"),
        "meta": (torch.empty(3, 4, device="meta"), "meta device"),
        "int": (torch.zeros(3, 4, dtype=torch.int64), "dtype torch.int64, expected torch.float32"),
        "bool": (torch.zeros(3, 4, dtype=torch.bool), "dtype torch.bool"),
        "float64 for float32": (torch.zeros(3, 4, dtype=torch.float64), "dtype torch.float64"),
        "shape": (torch.zeros(4, 3), r"shape \(4, 3\), the model expects \(3, 4\)"),
        "expanded": (torch.zeros(1, 4).expand(3, 4), "expanded view"),
        "beyond storage": (_shrunk_storage(), "beyond its storage"),
        "nan": (torch.zeros(3, 4).index_fill_(1, torch.tensor([2]), float("nan")), "NaN or Inf"),
        "inf": (torch.full((3, 4), float("-inf")), "NaN or Inf"),
    }
    for case, (t, msg) in cases.items():
        with pytest.raises(AdapterError, match=f"^x: w .*{msg}") as e:
            check_tensor("x: w", t, like=like)
        assert "\n" not in str(e.value), case
    with pytest.raises(AdapterError, match="overlapping or expanded view"):  # 16 elements from 7 stored
        check_tensor("x: w", torch.zeros(7).as_strided((4, 4), (1, 1)), like=torch.zeros(4, 4))
    check_tensor("x: w", torch.zeros(4, 3).t(), like=like)  # a transposed (non-contiguous) view is fine
    check_tensor("x: w", torch.zeros(3, 8)[:, ::2], like=like)  # so is a strided slice
    check_tensor("x: w", torch.zeros(10).as_strided((2, 3), (5, 2)), like=torch.zeros(2, 3))  # interleaved, disjoint
    check_tensor("x: w", nn.Parameter(torch.zeros(3, 4)), like=like)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):  # without `like`: any float type ...
        check_tensor("w", torch.zeros(2, dtype=dtype))
    with pytest.raises(AdapterError, match="complex64"):  # ... but only those
        check_tensor("w", torch.zeros(2, dtype=torch.complex64))
    steps = torch.tensor(3)  # with `like`, the model's own dtype, e.g. BatchNorm's int64 num_batches_tracked
    check_tensor("bn.num_batches_tracked", torch.tensor(7), like=steps)
    with pytest.raises(AdapterError, match="dtype torch.float32, expected torch.int64"):
        check_tensor("bn.num_batches_tracked", torch.tensor(7.0), like=steps)
    with pytest.raises(AdapterError, match="12 elements, more than the limit of 11"):
        check_tensor("w", torch.zeros(3, 4), max_numel=11)
    assert MAX_NUMEL == 2**28


def test_check_tensors_keys_totals_and_metadata_before_values():
    with pytest.raises(AdapterError, match="keys must be strings"):
        check_tensors({1: torch.zeros(1), "a": torch.zeros(1)}, {"a": torch.zeros(1)})
    with pytest.raises(AdapterError, match="expected a dict"):
        check_tensors([torch.zeros(1)])
    with pytest.raises(AdapterError, match=r"missing \['b'\], unexpected \['c'\]"):
        check_tensors({"a": torch.zeros(1), "c": torch.zeros(1)}, {"a": torch.zeros(1), "b": torch.zeros(1)})
    with pytest.raises(AdapterError, match="more than 10 elements in all"):
        check_tensors({"a": torch.zeros(6), "b": torch.zeros(6)}, max_numel=10)  # each fits, together not
    for key in ("evil\nkey", "k" * 10**6):  # a crafted key still gives a short, one-line message
        for ref in (None, {"w": torch.zeros(1)}):
            with pytest.raises(AdapterError) as e:
                check_tensors({key: torch.tensor([float("nan")])}, ref)
            assert "\n" not in str(e.value) and len(str(e.value)) < 300
    # metadata of every tensor is checked before any value is read: the sparse one is named, not the NaN
    with pytest.raises(AdapterError, match="b is not a dense"):
        check_tensors({"a": torch.tensor([float("nan")]), "b": torch.zeros(1).to_sparse()})
