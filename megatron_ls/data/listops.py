"""ListOps (Nangia & Bowman 2018) under the Long Range Arena rules (Tay et al. 2021), seeded and deterministic.

An example is a nested expression such as ``[MAX 2 9 [MIN 4 7 ] 0 ]`` and its label is the value (0-9).

Generation follows LRA's generator: a node at depth ``d < max_depth`` is an operator with probability 0.25
(else a value); the root has depth 1 and nodes at ``max_depth`` are values. An operator draws ``2..max_args``
arguments, then its name from MIN, MAX, MED, SM (sum mod 10); a value is drawn from 0-9. The length of a tree
counts one per value, operator and closing bracket; only trees with ``min_length < length < max_length`` are
kept, duplicates dropped. MED is ``int(median)`` (the mean of the two middle values, truncated, for an even
count), as LRA evaluates it. Random draws happen in the same order as LRA's generator, from a private
``random.Random(seed)``, and examples are kept in generation order (LRA used set order, which varies between
runs), so the splits are a pure function of the seed and the sizes.

Tokens: the tree in prefix order, ``[OP`` for an operator, a digit for a value and ``]`` after the last argument
(one token per length unit). LRA's released data lost the closing brackets to its tokenizer
(google-research/long-range-arena issue #14), which leaves expressions ambiguous; ``closing_brackets=False``
reproduces that input format.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import numpy as np

__all__ = ["OPERATORS", "VOCAB", "ListOpsConfig", "Tree", "generate_tree", "generate_examples", "evaluate",
           "tree_tokens", "encode"]

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
CLOSE = "]"
PAD, CLS = "<pad>", "<cls>"
# Fixed vocabulary: padding is id 0, the classification token id 1.
VOCAB = (PAD, CLS, CLOSE) + OPERATORS + tuple(str(d) for d in range(10))
_TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
OPERATOR_PROBABILITY = 0.25

# A tree is a value (int) or (operator, [arguments]).
Tree = Union[int, tuple]


@dataclass
class ListOpsConfig:
    """LRA defaults: depth <= 10, <= 10 arguments, lengths in (500, 2000)."""

    max_depth: int = 10
    max_args: int = 10
    min_length: int = 500
    max_length: int = 2000
    closing_brackets: bool = True

    def validate(self) -> None:
        if self.max_depth < 1:
            raise ValueError(f"--max-depth must be >= 1, got {self.max_depth}")
        if self.max_args < 2:
            raise ValueError(f"--max-args must be >= 2, got {self.max_args}")
        if not 0 <= self.min_length < self.max_length - 1:
            raise ValueError(f"need 0 <= --min-length < --max-length - 1 (lengths are kept when strictly between),"
                             f" got {self.min_length}, {self.max_length}")
        if self.max_depth == 1 and self.min_length >= 1:
            raise ValueError("--max-depth 1 makes every tree a single value of length 1; raise --max-depth")


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int) -> tuple[Tree, int]:
    """One random subtree at ``depth`` and its length (values, operators and closing brackets)."""
    # LRA draws the coin only below the depth limit, then the value / the arguments, then the operator.
    is_operator = depth < max_depth and rng.random() <= OPERATOR_PROBABILITY
    if not is_operator:
        return rng.choice(range(10)), 1
    num_args = rng.randint(2, max_args)
    args, length = [], 2
    for _ in range(num_args):
        child, child_length = generate_tree(rng, depth + 1, max_depth, max_args)
        args.append(child)
        length += child_length
    return (rng.choice(OPERATORS), args), length


def evaluate(tree: Tree) -> int:
    """The value of a tree (recursive; the tests check it against an independent token-stack evaluator)."""
    if isinstance(tree, int):
        return tree
    op, args = tree
    values = [evaluate(a) for a in args]
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return int(np.median(values))
    if op == "[SM":
        return sum(values) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def tree_tokens(tree: Tree, closing_brackets: bool = True) -> list[str]:
    """Prefix-order tokens of a tree (iterative: deep trees never hit the recursion limit)."""
    out: list[str] = []
    stack: list = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, int):
            out.append(str(node))
        else:
            op, args = node
            out.append(op)
            if closing_brackets:
                stack.append(CLOSE)
            stack.extend(reversed(args))
    return out


def encode(tokens: Sequence[str]) -> np.ndarray:
    """Token strings -> ids in :data:`VOCAB` (uint8)."""
    try:
        return np.fromiter((_TOKEN_ID[t] for t in tokens), dtype=np.uint8, count=len(tokens))
    except KeyError as exc:
        raise ValueError(f"not a ListOps token: {exc.args[0]!r}") from None


def generate_examples(num: int, seed: int, config: ListOpsConfig = ListOpsConfig()
                      ) -> Iterator[tuple[list[str], int]]:
    """``num`` distinct examples ``(tokens, label)`` in generation order, a pure function of the arguments."""
    config.validate()
    rng = random.Random(seed)
    seen: set[str] = set()
    made = attempts = 0
    while made < num:
        attempts += 1
        tree, length = generate_tree(rng, 1, config.max_depth, config.max_args)
        if not config.min_length < length < config.max_length:
            if made == 0 and attempts >= 1_000_000:
                raise RuntimeError(f"no tree with {config.min_length} < length < {config.max_length} in "
                                   f"{attempts} attempts: widen the length range or raise --max-depth/--max-args")
            continue
        full = tree_tokens(tree, closing_brackets=True)
        key = " ".join(full)
        if key in seen:
            continue
        seen.add(key)
        made += 1
        tokens = full if config.closing_brackets else [t for t in full if t != CLOSE]
        yield tokens, evaluate(tree)
