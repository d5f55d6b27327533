"""Write solar-quant's task sets (lm-eval format) and the --generate prompt set.

  sq_tiny_mc / sq_tiny_ll   hand-written multiple-choice and loglikelihood items (below)
  sq_arith_mc               generated arithmetic, 4 choices (answers computed)
  sq_cloze                  last word of sentences from the public-domain held-out text (../eval.txt)
  ../prompts.jsonl          prompts for `eval --generate`: single-turn instructions, reasoning,
                            multi-turn, and long input (a public-domain passage from ../prose.txt)

Items and prompts were written for solar-quant (CC0 1.0, see README.md); the passages are
public domain (State of the Union addresses, see ../README.md). Run from this folder:
    python make_tasks.py
Rerunning gives the same bytes.
"""

import json
import random
import re
from pathlib import Path

# (question, choices, index of the right choice)
MC_TEST = [
    ("Which of these is a mammal?", ["trout", "sparrow", "dolphin", "frog"], 2),
    ("What does a thermometer measure?", ["weight", "temperature", "speed", "distance"], 1),
    ("Water freezes at how many degrees Celsius?", ["0", "10", "50", "100"], 0),
    ("Which planet is closest to the Sun?", ["Mars", "Venus", "Earth", "Mercury"], 3),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("What do bees make?", ["milk", "silk", "honey", "wool"], 2),
    ("Which tool is used to cut paper?", ["scissors", "spoon", "hammer", "brush"], 0),
    ("What colour do you get by mixing blue and yellow?", ["red", "purple", "orange", "green"], 3),
    ("Which of these is a fruit?", ["carrot", "apple", "potato", "onion"], 1),
    ("What is the opposite of hot?", ["warm", "cold", "wet", "loud"], 1),
    ("How many days are in a week?", ["five", "six", "seven", "eight"], 2),
    ("Which animal is known for its long neck?", ["giraffe", "pig", "rabbit", "cat"], 0),
    ("What is 3 plus 4?", ["6", "7", "8", "9"], 1),
    ("Where do fish live?", ["in trees", "in water", "in sand", "in clouds"], 1),
    ("What do plants need from the Sun to grow?", ["sound", "light", "salt", "smoke"], 1),
    ("Which season comes after winter?", ["autumn", "summer", "spring", "winter"], 2),
    ("What is the main language of Brazil?", ["Spanish", "Portuguese", "French", "Italian"], 1),
    ("Which shape has three sides?", ["square", "circle", "triangle", "hexagon"], 2),
    ("What is ice made of?", ["water", "sand", "glass", "air"], 0),
    ("Which organ pumps blood through the body?", ["lung", "liver", "heart", "kidney"], 2),
    ("What is 10 minus 3?", ["5", "6", "7", "8"], 2),
    ("Which metal is liquid at room temperature?", ["iron", "mercury", "copper", "gold"], 1),
    ("What do you call a baby dog?", ["kitten", "calf", "puppy", "foal"], 2),
    ("Which of these is used to write?", ["pencil", "plate", "pillow", "shoe"], 0),
]
MC_FEWSHOT = [
    ("Which animal says moo?", ["cow", "dog", "duck", "owl"], 0),
    ("What is 2 plus 2?", ["3", "4", "5", "6"], 1),
    ("What falls from clouds when it rains?", ["snow", "sand", "water", "leaves"], 2),
]
# (context, continuation): the continuation is scored after the context (acc: is it the greedy path?)
LL_TEST = [
    ("The capital of France is", " Paris"),
    ("One, two, three, four,", " five"),
    ("The sun rises in the", " east"),
    ("Monday, Tuesday,", " Wednesday"),
    ("January, February,", " March"),
    ("The opposite of up is", " down"),
    ("Cats chase", " mice"),
    ("Red, orange, yellow,", " green"),
    ("A, B, C,", " D"),
    ("The sky on a clear day is", " blue"),
    ("Ten, twenty, thirty,", " forty"),
    ("Snow is cold and fire is", " hot"),
    ("Bread is baked in an", " oven"),
    ("The first letter of the alphabet is", " A"),
    ("Birds can fly because they have", " wings"),
    ("Night follows", " day"),
]
LL_FEWSHOT = [("The capital of Italy is", " Rome"), ("Two, four, six,", " eight")]


def write(path: str, rows: list[dict]) -> None:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def mc(rows):
    return [{"id": i, "question": q, "choices": c, "answer": a} for i, (q, c, a) in enumerate(rows)]


def ll(rows):
    return [{"id": i, "context": c, "continuation": t} for i, (c, t) in enumerate(rows)]


def arithmetic(n: int, seed: int) -> list[tuple[str, list[str], int]]:
    """'What is 17 plus 25?' with the right sum and three near misses, in a shuffled order."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        op = rng.choice(["plus", "minus", "times"]) if a > b else rng.choice(["plus", "times"])
        right = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        wrong = set()
        while len(wrong) < 3:
            w = right + rng.choice([-10, -2, -1, 1, 2, 10])
            if w >= 0 and w != right:
                wrong.add(w)
        choices = [str(x) for x in sorted([right, *wrong])]
        rows.append((f"What is {a} {op} {b}?", choices, choices.index(str(right))))
    return rows


def cloze(text: str, n: int, seed: int) -> list[tuple[str, str]]:
    """Sentences of 12-40 words ending in a plain word: (sentence without it, ' word')."""
    sentences = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))
    keep = []
    for s in sentences:
        words = s.split(" ")
        m = re.fullmatch(r"([A-Za-z]{3,})[.!?]", words[-1]) if len(words) >= 12 else None
        if m and len(words) <= 40 and s[0].isupper() and not s.isupper():
            keep.append((" ".join(words[:-1]), " " + m.group(1)))
    return random.Random(seed).sample(keep, n)


def long_input() -> str:
    """The first ~900 words of the 1920 address in ../prose.txt (public domain)."""
    doc = Path("../prose.txt").read_text().split("\n\n\n")
    text = next(d for d in doc if d.startswith("State of the Union Address, 1920"))
    return " ".join(text.split()[:900])


PROMPTS = [
    {"id": "instr-list", "kind": "instruction", "prompt": "List three ways to save water at home, one per line."},
    {"id": "instr-rewrite", "kind": "instruction",
     "prompt": "Rewrite this sentence in plain words: The committee has resolved to postpone its deliberations sine die."},
    {"id": "instr-email", "kind": "instruction",
     "messages": [{"role": "system", "content": "You are a concise assistant."},
                  {"role": "user", "content": "Write a two-sentence note telling a colleague the meeting moved to Friday."}]},
    {"id": "reason-apples", "kind": "reasoning",
     "prompt": "A basket holds 12 apples. You take away 5 and then add 3. How many apples are in the basket? Explain step by step."},
    {"id": "reason-train", "kind": "reasoning",
     "prompt": "A train leaves at 9:40 and the trip takes 1 hour 35 minutes. When does it arrive? Show your reasoning."},
    {"id": "reason-compare", "kind": "reasoning",
     "prompt": "Tom is taller than Ann. Ann is taller than Raj. Who is the shortest, and why?"},
    {"id": "multi-recipe", "kind": "multi-turn",
     "messages": [{"role": "user", "content": "I want to bake bread but I have no yeast."},
                  {"role": "assistant", "content": "You can make soda bread: it rises with baking soda and buttermilk."},
                  {"role": "user", "content": "I have no buttermilk either. What can I use?"}]},
    {"id": "multi-math", "kind": "multi-turn",
     "messages": [{"role": "user", "content": "What is 15 percent of 80?"},
                  {"role": "assistant", "content": "15 percent of 80 is 12."},
                  {"role": "user", "content": "And 15 percent of 120?"}]},
    {"id": "multi-travel", "kind": "multi-turn",
     "messages": [{"role": "system", "content": "You help people plan trips."},
                  {"role": "user", "content": "I have one free day in a city I do not know."},
                  {"role": "assistant", "content": "Start with a walk through the old town, then visit a museum."},
                  {"role": "user", "content": "It will rain all day. Change the plan."}]},
]


def prompts() -> list[dict]:
    passage = long_input()
    return PROMPTS + [
        {"id": "long-summary", "kind": "long input",
         "prompt": f"Summarize the following address in three sentences.\n\n{passage}"},
        {"id": "long-question", "kind": "long input",
         "prompt": f"{passage}\n\nAccording to the address above, what does the President ask Congress to do first?"},
    ]


if __name__ == "__main__":
    write("sq_arith_mc.test.jsonl", mc(arithmetic(200, seed=0)))
    write("sq_arith_mc.train.jsonl", mc(arithmetic(5, seed=1)))
    write("sq_cloze.test.jsonl", ll(cloze(Path("../eval.txt").read_text(), 300, seed=0)))
    write("../prompts.jsonl", prompts())
    write("sq_tiny_mc.test.jsonl", mc(MC_TEST))
    write("sq_tiny_mc.train.jsonl", mc(MC_FEWSHOT))
    write("sq_tiny_ll.test.jsonl", ll(LL_TEST))
    write("sq_tiny_ll.train.jsonl", ll(LL_FEWSHOT))
