"""Telling recorded inputs apart: items numbered in order of first appearance,
by value or by identity. How encoded images (which transformers 5.x `generate`
passes instead of pixels) are matched to the vision tower's recorded calls,
and how identical rows of a batch are found."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

__all__ = ["first_appearance", "same_values", "equality_classes", "identity_classes", "encoded_order"]


def first_appearance(items: Sequence, same: Callable[[object, object], bool]) -> Tuple[List[int], List[int]]:
    """(for each item the number of its class, for each class the index of its
    first item), classes numbered in order of first appearance under `same`."""
    firsts: List[int] = []
    classes: List[int] = []
    for i, item in enumerate(items):
        j = next((j for j, f in enumerate(firsts) if same(items[f], item)), None)
        if j is None:
            firsts.append(i)
            j = len(firsts) - 1
        classes.append(j)
    return classes, firsts


def same_values(a, b) -> bool:
    """Equal tensors, or tuples of tensors equal element-wise."""
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def equality_classes(items: Sequence) -> List[int]:
    """For each item (a tensor, or a tuple of tensors compared element-wise),
    the index of its class of equal items, classes numbered in order of first
    appearance. How encoded images that cannot be told apart by identity are
    matched to the recorded ones."""
    return first_appearance(list(items), same_values)[0]


def identity_classes(items: Sequence) -> Tuple[List[int], List[int]]:
    """`first_appearance` by object identity."""
    return first_appearance(list(items), lambda a, b: a is b)


def encoded_order(encoded, n_items: int) -> Optional[List[int]]:
    """Which recorded image (or video) each entry of an encoded `pooler_output`
    list is, told apart by identity. transformers 5.x `generate` with
    `num_return_sequences=K` repeats the entry objects to match the repeated
    rows (5.18 repeats each item K times in a row: [a, a, b, b], not
    [a, b, a, b]), so this is the order the model's rows actually received;
    the base model's prompt must follow it. None when it cannot be told."""
    pooled = getattr(encoded, "pooler_output", None)
    if not isinstance(pooled, (list, tuple)):
        return None
    order, firsts = identity_classes(pooled)
    return order if len(firsts) == n_items else None
