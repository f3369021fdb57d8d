"""Path-finding on a star graph: the source-to-goal path along a shuffled edge list."""
import re

import torch

from .base import Task, check_option, hash_split, round_up


class Star(Task):
    """Path-finding on a star graph (Bachmann & Nagarajan, "The pitfalls of next-token prediction").

    A source node with `degree` arms, each a chain of path_len-1 further nodes; node labels are
    distinct random letters among the first num_nodes letters. Problem = the edges (two letters,
    pointing away from the source) in random order, comma-separated, then ":", the source and the
    goal (the leaf of a random arm). degree=2, path_len=3: "de,ab,bc,ad:ae" -> answer "ade"
    (source..goal), or "eda" with reverse=True: backwards every next node is a lookup of the one
    edge into the current node, while forwards the first step needs planning (which arm leads to
    the goal?). Prompt = the problem, P = round_up(3*degree*(path_len-1) + 2, 4),
    L = round_up(path_len, 4), block_size 4 (defaults: P=16, L=4; degree=2, path_len=4: P=20, L=4).
    Reward: 1 if the first path_len characters of the response are the answer, else 0.
    Split: crc32 of the sorted edges, source and goal.
    """

    name = "star"
    # A small model, small batches and a constant rate learn the lookup in the fewest steps found
    # (docs/results.md, "Supervised training"; path_len=4 needs tens of thousands of steps)
    sft_recipe = {"n_layers": 2, "batch_size": 32, "min_lr_ratio": 1.0, "max_steps": 5000,
                  "eval_every": 1000}

    def __init__(self, degree: int = 2, path_len: int = 3, num_nodes: int = 20,
                 reverse: bool = False):
        super().__init__(degree=degree, path_len=path_len, num_nodes=num_nodes, reverse=reverse)
        self.degree = check_option("degree", degree, range(1, 26))
        self.path_len = check_option("path_len", path_len, range(2, 27))
        self.n_edges = degree * (path_len - 1)
        if self.n_edges + 1 > 26:
            raise ValueError(f"degree={degree}, path_len={path_len} need {self.n_edges + 1} "
                             "nodes; valid: at most 26")
        self.num_nodes = check_option("num_nodes", num_nodes, range(self.n_edges + 1, 27))
        self.reverse = check_option("reverse", reverse, (True, False))
        self.prompt_len = round_up(3 * self.n_edges + 2, 4)
        self.response_len = round_up(path_len, 4)

    def _path(self, problem: str) -> str | None:
        """The source..goal path along the problem's edges, or None if the problem is malformed."""
        match = re.fullmatch(r"((?:[a-z]{2},)*[a-z]{2}):([a-z])([a-z])", problem)
        if match is None:
            return None
        parent = {}
        for edge in match.group(1).split(","):
            parent.setdefault(edge[1], edge[0])
        path, source = [match.group(3)], match.group(2)  # walk back from the goal
        while path[-1] != source and path[-1] in parent and len(path) <= len(parent):
            path.append(parent[path[-1]])
        return "".join(reversed(path)) if path[-1] == source else None

    def answer_text(self, problem):
        path = self._path(problem)
        if path is None:
            raise ValueError(f"{problem!r} is not a graph-path problem like "
                             "'cd,ab,bc,ae,ef,fg:ad'")
        return path[::-1] if self.reverse else path

    def split_of(self, problem):
        self.answer_text(problem)  # validates
        edges, ends = problem.split(":")
        # Edge order does not matter.
        return hash_split(",".join(sorted(edges.split(","))) + ":" + ends)

    def score(self, problem, response_text):
        if self._path(problem) is None:
            return 0.0
        answer = self.answer_text(problem)
        return float(response_text[: len(answer)] == answer)

    def _candidates(self, m, split, generator):
        K, E = self.path_len, self.n_edges
        labels = torch.rand(m, self.num_nodes, generator=generator).argsort(1)[:, : E + 1].tolist()
        orders = torch.rand(m, E, generator=generator).argsort(1).tolist()  # edge shuffle
        arms = torch.randint(0, self.degree, (m,), generator=generator).tolist()  # the goal's arm
        problems = []
        for label, order, arm in zip(labels, orders, arms):
            names = [chr(ord("a") + i) for i in label]  # distinct letters; names[0] is the source
            chains = [names[:1] + names[1 + d * (K - 1): 1 + (d + 1) * (K - 1)]
                      for d in range(self.degree)]
            edges = [chain[i] + chain[i + 1] for chain in chains for i in range(K - 1)]
            problems.append(",".join(edges[o] for o in order) + ":" + names[0] + chains[arm][-1])
        return problems
