"""Two small synthetic corpora for the CPU demo and the tests, generated from a seed so the
repository ships no copied text and nothing is downloaded.

Both are regular enough that a two-layer model's loss falls clearly within a few hundred
steps, and different enough that a blend of them is a visible corpus ablation:

- stories: short tales from a small grammar, where names, pronouns and objects recur
  within a story (so attention to earlier tokens pays off);
- arithmetic: lines like "17 + 25 = 42", whose answers follow from the question.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

NAMES = {
    "she": ["Mia", "Lily", "Ana", "Zoe", "Nora", "Emma", "Sara", "Ruth"],
    "he": ["Tom", "Max", "Leo", "Ben", "Sam", "Omar", "Jack", "Finn"],
}
ADJECTIVES = ["red", "blue", "small", "big", "old", "new", "shiny", "soft", "green", "yellow"]
THINGS = ["ball", "kite", "book", "hat", "box", "cup", "boat", "drum", "key", "bell"]
PLACES = ["park", "garden", "river", "market", "forest", "school", "beach", "hill"]
PETS = ["dog", "cat", "bird", "frog", "fish", "rabbit"]
FEELINGS = ["happy", "sad", "tired", "proud", "surprised", "hungry", "calm"]
TIMES = ["One day", "In the morning", "After lunch", "Later", "That evening", "On Sunday"]


def _person(rng: random.Random, avoid: str | None = None) -> tuple[str, str]:
    pronoun = rng.choice(("she", "he"))
    name = rng.choice([n for n in NAMES[pronoun] if n != avoid])
    return name, pronoun


def story(rng: random.Random) -> str:
    """One story of 5-9 sentences built around two characters and one object."""
    hero, hero_pronoun = _person(rng)
    friend, friend_pronoun = _person(rng, avoid=hero)
    thing = f"{rng.choice(ADJECTIVES)} {rng.choice(THINGS)}"
    place = rng.choice(PLACES)
    pet = rng.choice(PETS)
    possessive = {"she": "her", "he": "his"}
    sentences = [
        f"{hero} had a {thing}.",
        f"{rng.choice(TIMES)}, {hero} went to the {place} with {friend}.",
    ]
    events = [
        f"{friend} wanted to play with the {thing}.",
        f"{hero_pronoun.capitalize()} saw a {pet} near the {place}.",
        f"The {pet} ran after the {thing}.",
        f"{friend} and {hero} sat under a tree.",
        f"{hero} lost the {thing}, and {friend} found it.",
        f"{friend_pronoun.capitalize()} told {hero} a story about a {pet}.",
        f"It started to rain, so they ran home.",
    ]
    sentences += rng.sample(events, rng.randint(2, 5))
    feeling = rng.choice(FEELINGS)
    sentences.append(f"{hero} gave the {thing} to {friend}, and {friend_pronoun} was {feeling}.")
    sentences.append(f"Then {hero} went home with {possessive[hero_pronoun]} {pet}.")
    return " ".join(sentences)


def arithmetic_line(rng: random.Random) -> str:
    operation = rng.choice("+-*")
    if operation == "*":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        return f"{a} * {b} = {a * b}"
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if operation == "-":
        a, b = max(a, b), min(a, b)
        return f"{a} - {b} = {a - b}"
    return f"{a} + {b} = {a + b}"


def arithmetic(rng: random.Random) -> str:
    """One document of 8-16 equations, one per line."""
    return "\n".join(arithmetic_line(rng) for _ in range(rng.randint(8, 16)))


CORPORA = {"stories": story, "arithmetic": arithmetic}


def generate(corpus: str, num_documents: int, seed: int) -> Iterator[str]:
    """`num_documents` documents of a corpus; the same seed gives the same text anywhere
    (random.Random's Mersenne Twister sequence is fixed across Python versions)."""
    make = CORPORA[corpus]
    rng = random.Random(f"{corpus}:{seed}")
    for _ in range(num_documents):
        yield make(rng)
