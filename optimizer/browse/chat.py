"""Original and steered answers to the same prompt, from one model with runtime steering.

``abopt chat`` lets a user try a trial before exporting it: the study's model answers each
prompt twice, untouched and with the trial's steering, greedily (what the study scored).
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table

from optimizer.engine.evaluate import greedy_generate
from optimizer.engine.markers import find_refusal
from optimizer.engine.model import chat_tokens
from optimizer.study.steered import TrialModel


@dataclass(frozen=True)
class Exchange:
    """One prompt and the two answers to it."""

    prompt: str
    original: str
    steered: str
    original_refuses: bool
    steered_refuses: bool


def answer(trial_model: TrialModel, prompt: str, *, steered: bool, max_tokens: int) -> str:
    """Greedy answer to ``prompt`` with the trial's steering on or off."""
    if steered:
        trial_model.steer()
    else:
        trial_model.clear()
    loaded = trial_model.loaded
    tokens = chat_tokens(loaded.tokenizer, prompt, trial_model.plan.config.prompts.system_prompt)
    outputs, _ = greedy_generate(loaded, [tokens], max_new_tokens=max_tokens)
    return loaded.tokenizer.decode(outputs[0]).strip()


def side_by_side(trial_model: TrialModel, prompt: str, *, max_tokens: int = 128) -> Exchange:
    """The untouched and the steered model's answers to ``prompt``."""
    original = answer(trial_model, prompt, steered=False, max_tokens=max_tokens)
    steered = answer(trial_model, prompt, steered=True, max_tokens=max_tokens)
    markers = trial_model.plan.markers
    return Exchange(
        prompt,
        original,
        steered,
        original_refuses=find_refusal(original, markers) is not None,
        steered_refuses=find_refusal(steered, markers) is not None,
    )


def exchange_table(exchange: Exchange, number: int) -> Table:
    """The two answers side by side, with which of them refuse."""
    table = Table(title=exchange.prompt, title_justify="left", show_lines=False, expand=True)
    refuses = {True: " (refuses)", False: ""}
    table.add_column(f"original{refuses[exchange.original_refuses]}", ratio=1)
    table.add_column(f"trial {number}{refuses[exchange.steered_refuses]}", ratio=1)
    table.add_row(exchange.original, exchange.steered)
    return table
