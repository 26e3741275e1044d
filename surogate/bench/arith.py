"""A generated task that a small pretrained model cannot solve: multi-step arithmetic word problems.

Each problem is a short story (shopping, stock, savings, travel, sharing, seating, baking) of two to four steps
with integer answers. The worked solution writes one equation per line and ends with `#### <answer>`, GSM8K's
convention, so the answer is found the same way in both. Samples are OpenAI-style conversations:

    {"messages": [{"role": "user", "content": <problem>}, {"role": "assistant", "content": <solution>}],
     "answer": <int>}

Generation is a pure function of the seed (Python's `random.Random`), so every run of the benchmark trains and
tests on the same files. Test problems are drawn from their own stream and any whose text also occurs in the
training set is redrawn, so the held-out set is disjoint from the training set.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

__all__ = ["make_problem", "make_splits", "write_jsonl", "read_jsonl", "extract_answer"]

NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira", "Liam", "Maya",
         "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yusuf", "Zoe")  # fmt: skip
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells", "stamps", "balloons")
GOODS = (("notebook", "notebooks"), ("sandwich", "sandwiches"), ("ticket", "tickets"), ("pen", "pens"),
         ("toy car", "toy cars"), ("plant", "plants"), ("mug", "mugs"))  # fmt: skip

Problem = tuple[str, list[str], int]  # (question, solution lines without the final "#### n", answer)


def _shopping(r: random.Random) -> Problem:
    name, many = r.choice(NAMES), r.choice(GOODS)[1]
    n, price, extra = r.randint(2, 9), r.randint(3, 25), r.randint(2, 15)
    cost = n * price
    bill = r.choice([b for b in (50, 100, 200, 500) if b >= cost + extra])
    total = cost + extra
    q = (
        f"{name} buys {n} {many} that cost ${price} each and a bag for ${extra}. {name} pays with a ${bill} bill. "
        f"How much change does {name} get, in dollars?"
    )
    steps = [
        f"The {many} cost {n} * {price} = {cost} dollars.",
        f"With the bag the total is {cost} + {extra} = {total} dollars.",
        f"The change is {bill} - {total} = {bill - total} dollars.",
    ]
    return q, steps, bill - total


def _stock(r: random.Random) -> Problem:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    start, boxes, per = r.randint(10, 90), r.randint(2, 9), r.randint(4, 24)
    got = boxes * per
    sold = r.randint(5, start + got - 1)
    q = (
        f"A shop run by {name} has {start} {item}. {name} receives {boxes} boxes with {per} {item} in each box, "
        f"then sells {sold} {item}. How many {item} are left?"
    )
    steps = [
        f"The boxes hold {boxes} * {per} = {got} {item}.",
        f"Then the shop has {start} + {got} = {start + got} {item}.",
        f"After the sale {start + got} - {sold} = {start + got - sold} are left.",
    ]
    return q, steps, start + got - sold


def _savings(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    weekly, weeks, gift = r.randint(5, 40), r.randint(3, 12), r.randint(10, 60)
    saved = weekly * weeks
    spent = r.randint(5, saved + gift - 1)
    left = saved + gift - spent
    q = (
        f"{name} saves ${weekly} every week for {weeks} weeks and gets ${gift} as a gift. Then {name} spends "
        f"${spent} on a game. How many dollars does {name} have left?"
    )
    steps = [
        f"{name} saves {weekly} * {weeks} = {saved} dollars.",
        f"With the gift that is {saved} + {gift} = {saved + gift} dollars.",
        f"After the game {saved + gift} - {spent} = {left} dollars are left.",
    ]
    return q, steps, left


def _travel(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    speed, hours, walk = r.randint(20, 90), r.randint(2, 6), r.randint(2, 15)
    drive = speed * hours
    back = r.randint(1, drive + walk - 1)
    q = (
        f"{name} drives at {speed} km per hour for {hours} hours, then walks {walk} km more. Later {name} rides "
        f"{back} km back toward the start. How far from the start is {name} now, in km?"
    )
    steps = [
        f"The drive covers {speed} * {hours} = {drive} km.",
        f"With the walk that is {drive} + {walk} = {drive + walk} km.",
        f"After riding back {drive + walk} - {back} = {drive + walk - back} km.",
    ]
    return q, steps, drive + walk - back


def _sharing(r: random.Random) -> Problem:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    friends, each = r.randint(2, 9), r.randint(3, 20)
    total = friends * each
    first = r.randint(1, total - 1)
    q = (
        f"{name} has {first} {item} and finds {total - first} more. {name} shares all of them equally among "
        f"{friends} friends. How many {item} does each friend get?"
    )
    steps = [
        f"{name} has {first} + {total - first} = {total} {item}.",
        f"Each friend gets {total} / {friends} = {each} {item}.",
    ]
    return q, steps, each


def _seating(r: random.Random) -> Problem:
    rows, seats, groups, per = r.randint(4, 15), r.randint(6, 20), r.randint(2, 6), r.randint(3, 12)
    cap = rows * seats
    arrived = groups * per
    if arrived > cap:
        groups = cap // per
        arrived = groups * per
    q = (
        f"A hall has {rows} rows with {seats} seats in each row. {groups} classes of {per} students each take a "
        "seat. How many seats are still empty?"
    )
    steps = [
        f"The hall has {rows} * {seats} = {cap} seats.",
        f"The classes bring {groups} * {per} = {arrived} students.",
        f"Empty seats: {cap} - {arrived} = {cap - arrived}.",
    ]
    return q, steps, cap - arrived


def _baking(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    batches, per, bag = r.randint(2, 8), r.randint(6, 24), r.randint(2, 6)
    baked = batches * per
    bags = r.randint(1, baked // bag)
    eaten = baked - bags * bag
    while eaten == 0 and bags > 1:
        bags -= 1
        eaten = baked - bags * bag
    q = (
        f"{name} bakes {batches} trays of {per} cookies and eats {eaten} of them. {name} packs the rest into bags "
        f"of {bag} cookies. How many bags does {name} fill?"
    )
    steps = [
        f"{name} bakes {batches} * {per} = {baked} cookies.",
        f"After eating, {baked} - {eaten} = {baked - eaten} cookies remain.",
        f"They fill {baked - eaten} / {bag} = {bags} bags.",
    ]
    return q, steps, bags


TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (
    _shopping, _stock, _savings, _travel, _sharing, _seating, _baking
)  # fmt: skip


def make_problem(r: random.Random) -> dict:
    """One conversation sample; the solution's last line is `#### <answer>`."""
    question, steps, answer = r.choice(TEMPLATES)(r)
    solution = "\n".join([*steps, f"#### {answer}"])
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": solution}],
        "answer": answer,
    }


def make_splits(n_train: int, n_test: int, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """`n_train` training and `n_test` held-out problems; no test question occurs in the training set."""
    train_rng, test_rng = random.Random(seed), random.Random(seed + 1)
    train = [make_problem(train_rng) for _ in range(n_train)]
    seen = {s["messages"][0]["content"] for s in train}
    test: list[dict] = []
    while len(test) < n_test:
        s = make_problem(test_rng)
        if s["messages"][0]["content"] not in seen:
            seen.add(s["messages"][0]["content"])
            test.append(s)
    return train, test


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The final number of a completion: the first number after the last `####` when there is one, else the last
    number in the text (GSM8K's "flexible extract", which gives a model that never learned the format a fair chance).
    Commas are dropped and trailing decimal zeros removed, so `1,200.0` and `1200` compare equal."""
    after = _NUMBER.findall(text.rsplit("####", 1)[1]) if "####" in text else []
    numbers = after[:1] or _NUMBER.findall(text)[-1:]
    if not numbers:
        return None
    value = numbers[0].replace(",", "")
    return value.rstrip("0").rstrip(".") if "." in value else value
