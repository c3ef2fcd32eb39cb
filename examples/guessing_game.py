"""A multi-turn environment without tools: guess the number, with "higher"/"lower" feedback.

Use it in a recipe::

    rollout:
      env: examples/guessing_game.py:GuessingGame
      env_kwargs: {low: 1, high: 20}
      max_turns: 5

Each episode draws a secret number (from the dataset row's ``secret`` column if it has one, else at
random), asks for a guess, and answers every turn with "higher", "lower" or "correct". The reward is
per turn: 1 for the correct guess, and the episode ends there; a turn without a number costs 0.1.
The model therefore learns to read the feedback and narrow the range (binary search is optimal).
"""

from __future__ import annotations

import random
import re

from rlhf_pg.envs import Environment, EnvStep


class GuessingGame(Environment):
    info_keys = ("solved", "invalid")
    """Logged per episode as episode/solved and episode/invalid."""

    def __init__(self, low: int = 1, high: int = 20, seed: int | None = None):
        self.low, self.high = low, high
        self.rng = random.Random(seed)

    def reset(self, row: dict) -> list[dict]:
        secret = row.get("secret")
        self.secret = int(secret) if secret is not None else self.rng.randint(self.low, self.high)
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
