"""Write the solar-quant tiny task set (sq_tiny_mc, sq_tiny_ll) as JSON lines, in lm-eval's format.

Every item was written for solar-quant (CC0 1.0, see README.md). Run from this folder:
    python make_tiny.py
It rewrites the .jsonl files from the lists below; rerunning gives the same bytes.
"""

import json
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


if __name__ == "__main__":
    write("sq_tiny_mc.test.jsonl", mc(MC_TEST))
    write("sq_tiny_mc.train.jsonl", mc(MC_FEWSHOT))
    write("sq_tiny_ll.test.jsonl", ll(LL_TEST))
    write("sq_tiny_ll.train.jsonl", ll(LL_FEWSHOT))
