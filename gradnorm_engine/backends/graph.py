"""Facts about one forward's autograd graph, read by walking it once from the loss.

    graph = Graph(loss.grad_fn)
    graph.leaf_nodes[id(param)]         # the AccumulateGrad node of each parameter the loss reaches
    graph.uses(hooked)[id(param)]       # how many times the forward used each parameter
    graph.above(candidates)             # the candidates with another candidate below them
    graph.below(nodes)                  # the nodes and every node under them
"""
from __future__ import annotations


class Graph:
    """The nodes the loss reaches, each with its parents (towards the loss) and children."""

    def __init__(self, root):
        self.root = root
        self.parents: dict = {root: []}
        self.children: dict = {}
        self.leaf_nodes: dict[int, object] = {}     # id(variable) -> its AccumulateGrad node
        stack = [root]
        while stack:
            node = stack.pop()
            variable = getattr(node, "variable", None)
            if variable is not None and type(node).__name__ == "AccumulateGrad":
                self.leaf_nodes[id(variable)] = node
            kids = [nxt for nxt, _ in node.next_functions if nxt is not None]
            self.children[node] = kids
            for nxt in kids:
                if nxt not in self.parents:
                    self.parents[nxt] = []
                    stack.append(nxt)
                self.parents[nxt].append(node)

    def __contains__(self, node) -> bool:
        return node in self.parents

    def uses(self, hooked) -> dict[int, int]:
        """How many times the forward used each leaf: edges into its AccumulateGrad count one each,
        except that a single-input node (a cast, a transpose) that is not in ``hooked`` passes on
        the count of its own consumers, so autocast's cached weight cast used twice counts twice."""
        through: dict = {}

        def count(node) -> int:
            if node in through:
                return through[node]
            todo = [node]                       # iterative: chains of casts can be long
            while todo:
                n = todo[-1]
                if n in through:
                    todo.pop()
                    continue
                if n is self.root or n in hooked or len(self.children[n]) != 1:
                    through[n] = 1
                    todo.pop()
                    continue
                pending = [p for p in self.parents[n] if p not in through]
                if pending:
                    todo.extend(pending)
                    continue
                through[n] = sum(through[p] for p in self.parents[n])
                todo.pop()
            return through[node]

        return {i: sum(count(p) for p in self.parents[node]) for i, node in self.leaf_nodes.items()}

    def below(self, nodes) -> set:
        """``nodes`` and every node under them (towards the leaves): those whose gradient passes one of them."""
        seen = set(nodes)
        stack = list(seen)
        while stack:
            for kid in self.children[stack.pop()]:
                if kid not in seen:
                    seen.add(kid)
                    stack.append(kid)
        return seen

    def above(self, candidates) -> set:
        """The ``candidates`` with another candidate somewhere below them."""
        below: dict = {}
        for node in self.topological():
            below[node] = any(kid in candidates or below[kid] for kid in self.children[node])
        return {n for n in candidates if below.get(n, False)}

    def topological(self) -> list:
        """Nodes so that every node comes after all nodes below it (children first)."""
        seen, result = set(), []
        stack = [(self.root, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                result.append(node)
                continue
            if node in seen:
                continue
            seen.add(node)
            stack.append((node, True))
            for kid in self.children[node]:
                if kid not in seen:
                    stack.append((kid, False))
        return result
