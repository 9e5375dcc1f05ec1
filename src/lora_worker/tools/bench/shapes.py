"""What the bench runs: model shapes and their FLOPs per token, MFU, and the grid of configurations.

A configuration is written `recipe:ROWSxSEQ`; its budget is ROWS x SEQ tokens per micro-batch.
Recipes: `project` (the worker's path), `project-offload` (the same with `training.activation_offload`
on), `packed` (the worker's path with documents packed into one row) and `seed` (the baseline).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from lora_worker.runtime.gpu_rates import peak_bf16_flops

RECIPES = ("project", "project-offload", "packed", "seed")
# Recipes that run the worker's own training path (compared with the seed at the same budget).
PROJECT_RECIPES = ("project", "project-offload", "packed")
# Recipes the largest-budget search may probe (one row per micro-batch).
SEARCH_RECIPES = ("project", "project-offload")


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    inter: int
    heads: int
    kv: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: the seven projections of each layer + LM head."""
        kv_width = self.kv * self.head_dim
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * kv_width + 3 * self.hidden * self.inter
        return self.layers * per_layer + self.vocab * self.hidden

    def flops_per_token(self) -> float:
        """FLOPs per trained token: forward (2N), checkpoint recompute (2N), activation grads (2N).

        No weight grads (the base is frozen; LoRA's are negligible) and no attention-score FLOPs
        (they grow with the sequence and are left out, so MFU at long budgets reads a little low).
        For the 70B shape N = 69.5e9, so about 417 GFLOP per token.
        """
        return 6.0 * self.matmul_params()


SHAPES: dict[str, Shape] = {
    "70b": Shape(layers=80, hidden=8192, inter=28672, heads=64, kv=8, vocab=128256),
    "8b": Shape(layers=32, hidden=4096, inter=14336, heads=32, kv=8, vocab=128256),
    # The CPU smoke test's shape: same architecture, a few thousand parameters per layer.
    "tiny": Shape(layers=2, hidden=64, inter=192, heads=4, kv=2, vocab=1024),
}


def peak_flops(card: str) -> float | None:
    """Dense bf16 peak FLOP/s of a card by its name (runtime.gpu_rates), or None when unknown."""
    return peak_bf16_flops(card)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: useful FLOP/s over the card's dense bf16 peak."""
    if not peak or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_token / peak


@dataclass(frozen=True)
class RunSpec:
    recipe: str  # one of RECIPES
    rows: int
    seq: int  # tokens per row

    @property
    def budget(self) -> int:
        return self.rows * self.seq

    @property
    def label(self) -> str:
        return f"{self.recipe}:{self.rows}x{self.seq}"


def plan_runs(
    recipes: Sequence[str], budgets: Sequence[int], rows: Sequence[int], *, seed_seq: int
) -> list[RunSpec]:
    """The grid: for each budget (ascending), the seed recipe first, then the project's configs
    (`project`, `project-offload`, `packed`, those of them in `recipes`).

    The seed recipe always uses rows of `seed_seq` tokens (budget / seed_seq rows). The project
    uses each `rows` value, capped so that a row is at least `seed_seq` tokens long (budget 2048
    with rows 4 is 1 x 2048, not 4 x 512).
    """
    out: list[RunSpec] = []
    for b in sorted(set(budgets)):
        if "seed" in recipes and b >= seed_seq and b % seed_seq == 0:
            out.append(RunSpec("seed", b // seed_seq, seed_seq))
        for recipe in PROJECT_RECIPES:
            if recipe not in recipes:
                continue
            for r in rows:
                r = max(1, min(r, b // seed_seq))
                # One document per row is the plain project path, so `packed` needs two or more.
                if b % r == 0 and (recipe != "packed" or r > 1):
                    out.append(RunSpec(recipe, r, b // r))
    return list(dict.fromkeys(out))  # first occurrence of each, in order


def parse_runs(text: str) -> list[RunSpec]:
    """'seed:1x2048,project:4x2048,project-offload:1x32768' -> RunSpecs (recipe:ROWSxSEQ)."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        m = re.fullmatch(rf"({'|'.join(map(re.escape, RECIPES))}):(\d+)x(\d+)", item)
        if not m:
            raise ValueError(
                f"bad config {item!r}: expected recipe:ROWSxSEQ with recipe one of {', '.join(RECIPES)}, "
                "e.g. project:4x2048"
            )
        out.append(RunSpec(m[1], int(m[2]), int(m[3])))
    return out


def parse_ints(text: str) -> list[int]:
    """'2048,8192' -> [2048, 8192]."""
    return [int(x) for x in text.split(",") if x.strip()]
