"""A multi-turn environment without tools: guess the number, with "higher"/"lower" feedback.

Use it in a recipe::

    rollout:
      env: examples/guessing_game.py:GuessingGame
      env_kwargs: {low: 1, high: 20}
      max_turns: 5

Each episode draws a secret number (from the dataset row's ``secret`` column if it has one, else from
the episode's ``seed``, so a run and its resume play the same games), asks for a guess, and answers
every turn with "Higher." or "Lower.". The reward is per turn: 1 for the correct guess (the episode
ends there), −0.1 for a turn without a number. The model learns to read the feedback and narrow the
range (binary search is optimal).
"""

from __future__ import annotations

import random
import re

from rlhf_pg.envs import Environment, EnvStep


class GuessingGame(Environment):
    info_keys = ("solved", "invalid")
    """Logged per episode as episode/solved and episode/invalid."""

    def __init__(self, low: int = 1, high: int = 20):
        self.low, self.high = low, high

    def reset(self, row: dict, seed: int = 0) -> list[dict]:
        secret = row.get("secret")
        self.secret = int(secret) if secret is not None else random.Random(seed).randint(self.low, self.high)
        return [
            {
                "role": "user",
                "content": f"I am thinking of a whole number from {self.low} to {self.high}. Guess it: answer with "
                "one number. I will tell you if my number is higher or lower.",
            }
        ]

    def step(self, text: str, token_ids: list[int]) -> EnvStep:
        numbers = re.findall(r"-?\d+", text)
        if not numbers:
            return EnvStep("Answer with one number.", reward=-0.1, info={"invalid": 1})
        guess = int(numbers[-1])
        if guess == self.secret:
            return EnvStep(None, reward=1.0, done=True, info={"solved": 1})
        return EnvStep("Higher." if guess < self.secret else "Lower.")
