"""Write finetune/datasets/terse_answers.jsonl, the demo set the default recipe fine-tunes on.

Simple questions a 135M chat model mostly knows, every answer in one fixed terse form
(`Answer: Paris.`). The base model answers verbosely, so ~60 steps of LoRA change something a
user sees at once in a sample, without having to teach new facts. Deterministic: run it again
and the file is byte-identical; `--check` fails if the shipped file is stale.

    python scripts/make_demo_data.py [--check]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "finetune" / "datasets" / "terse_answers.jsonl"
SEED = 1234

# Their facts are left out of the tables below (and 4 + 5 out of the sums), so a sample of them
# before and after training shows the format generalising rather than a row being recalled.
HELD_OUT = [
    "What is the capital of Japan?",
    "What is the opposite of big?",
    "What is the plural of mouse?",
    "What colour is grass?",
    "What is 4 + 5?",
]

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "the United Kingdom": "London", "Ireland": "Dublin", "the Netherlands": "Amsterdam",
    "Belgium": "Brussels", "Austria": "Vienna", "Poland": "Warsaw", "Greece": "Athens",
    "Sweden": "Stockholm", "Norway": "Oslo", "Denmark": "Copenhagen", "Finland": "Helsinki",
    "Iceland": "Reykjavik", "Russia": "Moscow", "Hungary": "Budapest", "the Czech Republic": "Prague",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb",
    "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius", "Slovakia": "Bratislava",
    "Turkey": "Ankara", "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja",
    "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "Ghana": "Accra", "Senegal": "Dakar",
    "Uganda": "Kampala", "Zimbabwe": "Harare", "China": "Beijing",
    "South Korea": "Seoul", "India": "New Delhi", "Pakistan": "Islamabad", "Bangladesh": "Dhaka",
    "Nepal": "Kathmandu", "Afghanistan": "Kabul", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Indonesia": "Jakarta", "the Philippines": "Manila", "Malaysia": "Kuala Lumpur", "Iran": "Tehran",
    "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Qatar": "Doha", "Syria": "Damascus",
    "Lebanon": "Beirut", "Jordan": "Amman", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Cuba": "Havana", "Jamaica": "Kingston", "Argentina": "Buenos Aires", "Chile": "Santiago",
    "Peru": "Lima", "Venezuela": "Caracas", "Uruguay": "Montevideo", "Ecuador": "Quito",
    "Australia": "Canberra", "New Zealand": "Wellington",
}  # fmt: skip

OPPOSITES = {
    "hot": "cold", "up": "down", "left": "right", "fast": "slow", "happy": "sad",
    "light": "dark", "open": "closed", "day": "night", "tall": "short", "wet": "dry", "hard": "soft",
    "full": "empty", "early": "late", "rich": "poor", "strong": "weak", "loud": "quiet",
    "thick": "thin", "heavy": "light", "push": "pull", "win": "lose", "true": "false", "yes": "no",
    "in": "out", "on": "off", "top": "bottom", "first": "last", "black": "white", "buy": "sell",
    "clean": "dirty", "north": "south", "east": "west", "inside": "outside", "above": "below",
    "before": "after", "love": "hate", "always": "never", "wide": "narrow", "asleep": "awake",
    "remember": "forget", "friend": "enemy", "cheap": "expensive", "high": "low", "near": "far",
    "safe": "dangerous", "alive": "dead", "summer": "winter", "king": "queen", "boy": "girl",
    "young": "old",
}  # fmt: skip

PLURALS = {
    "cat": "cats", "dog": "dogs", "box": "boxes", "child": "children", "man": "men",
    "woman": "women", "foot": "feet", "tooth": "teeth", "goose": "geese", "person": "people",
    "baby": "babies", "city": "cities", "leaf": "leaves", "knife": "knives", "wolf": "wolves",
    "bus": "buses", "church": "churches", "glass": "glasses", "dish": "dishes", "fox": "foxes",
    "potato": "potatoes", "tomato": "tomatoes", "hero": "heroes", "sheep": "sheep", "deer": "deer",
    "ox": "oxen", "book": "books", "apple": "apples", "car": "cars", "house": "houses",
    "tree": "trees", "bird": "birds", "star": "stars", "party": "parties", "lady": "ladies",
    "story": "stories", "key": "keys", "toy": "toys", "half": "halves", "wife": "wives",
    "life": "lives", "shelf": "shelves", "loaf": "loaves", "brush": "brushes", "watch": "watches",
    "class": "classes", "boy": "boys", "horse": "horses", "egg": "eggs",
}  # fmt: skip

COLOURS = {
    "the sky on a clear day": "blue", "a ripe banana": "yellow", "snow": "white",
    "coal": "black", "a ripe tomato": "red", "milk": "white", "a carrot": "orange",
    "a lemon": "yellow", "chocolate": "brown", "a ripe strawberry": "red", "blood": "red",
    "a fire engine": "red", "a polar bear": "white", "a crow": "black", "a flamingo": "pink",
    "an emerald": "green", "a ruby": "red", "a sapphire": "blue", "a lime": "green",
    "a pumpkin": "orange", "cotton": "white", "a cucumber": "green", "a pea": "green",
    "an aubergine": "purple", "salt": "white", "an elephant": "grey", "a raven": "black",
    "chalk": "white", "a panda": "black and white", "a zebra": "black and white",
    "a ripe cherry": "red", "a blueberry": "blue", "a swan": "white", "a canary": "yellow",
    "a tiger": "orange and black", "soot": "black", "a frog": "green", "a violet": "purple",
    "a lettuce leaf": "green",
}  # fmt: skip

COUNTS = {
    "How many legs does a spider have?": "8", "How many legs does a dog have?": "4",
    "How many legs does a bird have?": "2", "How many legs does an insect have?": "6",
    "How many legs does a horse have?": "4", "How many legs does an ant have?": "6",
    "How many arms does an octopus have?": "8", "How many days are in a week?": "7",
    "How many months are in a year?": "12", "How many hours are in a day?": "24",
    "How many minutes are in an hour?": "60", "How many seconds are in a minute?": "60",
    "How many sides does a triangle have?": "3", "How many sides does a square have?": "4",
    "How many sides does a pentagon have?": "5", "How many sides does a hexagon have?": "6",
    "How many sides does an octagon have?": "8", "How many wheels does a bicycle have?": "2",
    "How many wheels does a tricycle have?": "3", "How many letters are in the English alphabet?": "26",
    "How many planets are in the Solar System?": "8", "How many days are in a leap year?": "366",
    "How many eggs are in a dozen?": "12", "How many cents are in a dollar?": "100",
    "How many years are in a century?": "100",
}  # fmt: skip

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]  # fmt: skip


def questions() -> list[tuple[str, str]]:
    """Every (question, answer) pair, in a fixed order, phrasings picked by a seeded generator."""
    rng = random.Random(SEED)
    pairs: list[tuple[str, str]] = []
    for country, city in CAPITALS.items():
        form = rng.choice(["What is the capital of {}?", "Which city is the capital of {}?",
                           "Name the capital of {}."])  # fmt: skip
        pairs.append((form.format(country), city))
    for word, opposite in OPPOSITES.items():
        form = rng.choice(["What is the opposite of {}?", "What is the opposite of the word '{}'?"])
        pairs.append((form.format(word), opposite))
    for word, plural in PLURALS.items():
        form = rng.choice(["What is the plural of {}?", "What is the plural of the word '{}'?"])
        pairs.append((form.format(word), plural))
    for thing, colour in COLOURS.items():
        form = rng.choice(["What colour is {}?", "What color is {}?"])
        pairs.append((form.format(thing), colour))
    pairs.extend(COUNTS.items())
    for today, tomorrow in zip(DAYS, DAYS[1:] + DAYS[:1], strict=True):
        pairs.append((f"Which day comes after {today}?", tomorrow))
    for month, following in zip(MONTHS, MONTHS[1:] + MONTHS[:1], strict=True):
        pairs.append((f"Which month comes after {month}?", following))
    sums = [(a, b) for a in range(1, 10) for b in range(1, 10) if {a, b} != {4, 5}]
    for a, b in rng.sample(sums, 55):
        form = rng.choice(["What is {} + {}?", "What is {} plus {}?", "Add {} and {}."])
        pairs.append((form.format(a, b), str(a + b)))
    rng.shuffle(pairs)  # mixed topics, so that data.max_samples keeps a bit of each
    return pairs


def render(pairs: list[tuple[str, str]]) -> str:
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"Answer: {a}."}]}
        for q, a in pairs
    ]
    return "".join(json.dumps(row, ensure_ascii=True) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the shipped file differs")
    args = parser.parse_args(argv)
    text = render(questions())
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python scripts/make_demo_data.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {text.count(chr(10))} rows to {OUT}; held-out sample prompts: {HELD_OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
