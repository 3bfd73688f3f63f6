"""Facts about one forward's autograd graph that decide which parameters the rules may score.

    uses, reachable, above_another = graph_facts(loss.grad_fn, hooked_nodes, candidate_nodes)
"""
from __future__ import annotations


def graph_facts(root, hooked: set, candidates: set):
    """Walk the autograd graph from ``root`` once.

    hooked: the output nodes of every recorded layer call; candidates: those whose rule will
    run. Returns (uses, reachable, above_another):
      uses[id(param)]  how many times the forward used each leaf parameter. Edges into its
                       AccumulateGrad count one each, except that a single-input node (a cast,
                       a transpose) that is not a layer output passes on the count of its own
                       consumers, so autocast's cached weight cast used twice counts twice.
      reachable        the hooked nodes the loss reaches.
      above_another    the candidate nodes with another candidate node somewhere below them.
    """
    parents: dict = {root: []}
    children: dict = {}
    order = []
    stack = [root]
    while stack:
        node = stack.pop()
        order.append(node)
        kids = [nxt for nxt, _ in node.next_functions if nxt is not None]
        children[node] = kids
        for nxt in kids:
            if nxt not in parents:
                parents[nxt] = []
                stack.append(nxt)
            parents[nxt].append(node)

    through: dict = {}

    def uses_through(node) -> int:
        if node in through:
            return through[node]
        if node is root or node in hooked or len(children[node]) != 1:
            count = 1
        else:
            count = sum(uses_through(p) for p in parents[node])
        through[node] = count
        return count

    uses: dict[int, int] = {}
    for node in order:
        variable = getattr(node, "variable", None)
        if variable is not None and type(node).__name__ == "AccumulateGrad":
            uses[id(variable)] = uses.get(id(variable), 0) + sum(uses_through(p) for p in parents[node])

    # Whether a candidate lies below each node, children before parents.
    has_below: dict = {}
    for node in topological(root, children):
        has_below[node] = any(kid in candidates or has_below[kid] for kid in children[node])
    above_another = {n for n in candidates if has_below.get(n, False)}
    reachable = {n for n in hooked if n in parents}
    return uses, reachable, above_another


def topological(root, children) -> list:
    """Nodes so that every node comes after all nodes below it (children first)."""
    seen, result = set(), []
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            result.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        for kid in children[node]:
            if kid not in seen:
                stack.append((kid, False))
    return result
