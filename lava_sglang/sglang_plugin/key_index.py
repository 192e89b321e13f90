"""The compressed prefixes by key, in a radix tree of their own.

A match asks for the longest compressed prefix whose whole key starts a request's key. Most
prompts start alike (a BOS token, a chat template's opening, a shared system prompt), so a
list per first token made every match compare the request with every stored document
(`scripts/key_index_timing.py` times both). Here one walk from the root reads each
of the request's tokens at most once, however many documents share a header.

The keys are SGLang's RadixKeys, compared token by token (page size 1, as the compressed
prefixes are matched) and within their namespace (`child_key_at` holds the LoRA adapter's
key and the cache salt, so keys of other namespaces never meet).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

Item = TypeVar("Item")


class _IndexNode:
    __slots__ = ("key", "parent", "children", "item")

    def __init__(self, key, parent):
        self.key = key  # the tokens from the parent to here (None at the root)
        self.parent = parent
        self.children: dict = {}  # child_key of the first token -> _IndexNode
        self.item = None  # what is stored under the key that ends here


class KeyIndex(Generic[Item]):
    """Items (the compressed nodes) stored under RadixKeys, one per key."""

    def __init__(self):
        self.root = _IndexNode(None, None)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Item]:
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node.item is not None:
                yield node.item
            stack.extend(node.children.values())

    def add(self, key, item: Item) -> None:
        """Store `item` under `key` (non-empty); a key holds one item."""
        if len(key) == 0:
            raise ValueError("an empty key starts every key: nothing is stored under it")
        node, offset = self.root, 0
        while offset < len(key):
            first = key.child_key_at(offset, 1)
            child = node.children.get(first)
            if child is None:
                child = _IndexNode(key[offset:], node)
                node.children[first] = child
                node, offset = child, len(key)
                break
            matched = child.key.match_at(key, offset)
            if matched < len(child.key):  # the key parts from the child's run: split it there
                middle = _IndexNode(child.key[:matched], node)
                node.children[first] = middle
                child.key, child.parent = child.key[matched:], middle
                middle.children[child.key.child_key_at(0, 1)] = child
                child = middle
            node, offset = child, offset + matched
        if node.item is not None:
            raise ValueError(f"a {len(key)}-token key already holds an item")
        node.item = item
        self._size += 1

    def remove(self, key) -> Item:
        """Take out and return the item stored under `key`; KeyError where none is."""
        node = next((node for node, read in self._walk(key) if read == len(key)), None)
        if node is None or node.item is None:
            raise KeyError(f"no item under this {len(key)}-token key")
        item, node.item = node.item, None
        self._size -= 1
        while node is not self.root and node.item is None and not node.children:  # prune the bare branch
            del node.parent.children[node.key.child_key_at(0, 1)]
            node = node.parent
        return item

    def longest_prefix_of(self, key) -> Item | None:
        """The item whose key is the longest one that `key` starts with (all of it matched)."""
        best = None
        for node, _ in self._walk(key):
            if node.item is not None:
                best = node.item
        return best

    def _walk(self, key) -> Iterator[tuple[_IndexNode, int]]:
        """Each node whose whole run `key` continues through, from the root's child on, with how
        many of `key`'s tokens are read at its end."""
        node, read = self.root, 0
        while read < len(key):
            node = node.children.get(key.child_key_at(read, 1))
            if node is None or node.key.match_at(key, read) < len(node.key):
                return
            read += len(node.key)
            yield node, read
