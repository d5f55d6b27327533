"""Instruction records written for solar-quant (Apache-2.0), used by make_bundled.py.

`ALPACA` and `ORCA` are hand-written; `arithmetic_records` generates word problems whose
worked answers are computed, so they are correct by construction.
"""

from __future__ import annotations

import random

ALPACA = [
    {"instruction": "Explain what quantization means for a neural network, in two or three sentences.", "input": "",
     "output": "Quantization stores a network's weights (and sometimes its activations) with fewer bits, for example "
               "4-bit integers instead of 16-bit floating point numbers. Each group of weights keeps a scale, so the "
               "integers can be mapped back to approximate real values. The model becomes smaller and often faster, "
               "at the cost of a small loss in accuracy."},
    {"instruction": "Give three tips for writing a clear email to a colleague.", "input": "",
     "output": "1. Put the request or the main point in the first sentence, so the reader knows why you are writing.\n"
               "2. Keep one topic per email and use a subject line that names it.\n"
               "3. End with the next step: what you need, from whom, and by when."},
    {"instruction": "Classify each animal as a mammal, a bird, a reptile or a fish.", "input": "salmon, crocodile, bat, penguin, whale",
     "output": "- salmon: fish\n- crocodile: reptile\n- bat: mammal\n- penguin: bird\n- whale: mammal"},
    {"instruction": "Rewrite the sentence in the passive voice.", "input": "The committee approved the new budget on Monday.",
     "output": "The new budget was approved by the committee on Monday."},
    {"instruction": "Summarize the main idea of the paragraph in one sentence.",
     "input": "Regular sleep affects almost every system in the body. People who sleep seven to nine hours a night "
              "tend to remember more of what they learned during the day, recover faster from illness, and report "
              "a steadier mood than people who routinely sleep less.",
     "output": "Getting seven to nine hours of sleep regularly improves memory, recovery from illness and mood."},
    {"instruction": "Write a Python function that returns the largest even number in a list, or None if there is none.", "input": "",
     "output": "```python\ndef largest_even(numbers):\n    evens = [n for n in numbers if n % 2 == 0]\n    return max(evens) if evens else None\n```\n\n"
               "The list comprehension keeps the even numbers; `max` picks the largest, and an empty list returns None."},
    {"instruction": "What is the difference between weather and climate?", "input": "",
     "output": "Weather is the state of the atmosphere at a given place and time: today's temperature, rain or wind. "
               "Climate is the long-term pattern of weather in a region, usually described by averages and ranges "
               "over thirty years or more. Weather changes from hour to hour; climate changes over decades."},
    {"instruction": "Translate the sentence into French.", "input": "The library opens at nine o'clock.",
     "output": "La bibliothèque ouvre à neuf heures."},
    {"instruction": "Suggest a name for a bakery that specializes in sourdough bread, and explain the choice.", "input": "",
     "output": "\"Slow Rise Bakery\". Sourdough is leavened by a starter over many hours, so the name points to the long "
               "fermentation that gives the bread its flavor, and it is short and easy to remember."},
    {"instruction": "Convert the list into a comma-separated sentence.", "input": "apples\nbread\nmilk\neggs",
     "output": "We need apples, bread, milk and eggs."},
    {"instruction": "Explain why the sky looks blue during the day.", "input": "",
     "output": "Sunlight contains all visible colors. When it passes through the atmosphere, the small gas molecules "
               "scatter short wavelengths much more strongly than long ones (Rayleigh scattering). Blue light is "
               "scattered across the whole sky, so wherever we look away from the sun we see blue."},
    {"instruction": "Find the grammatical error in the sentence and correct it.", "input": "Each of the students have finished their project.",
     "output": "The subject is \"each\", which is singular, so the verb should be \"has\": \"Each of the students has finished their project.\""},
    {"instruction": "List four renewable sources of energy.", "input": "",
     "output": "- Solar power\n- Wind power\n- Hydroelectric power\n- Geothermal energy"},
    {"instruction": "Write a haiku about autumn.", "input": "",
     "output": "Maple leaves let go\nthe wind carries them downhill\nthe tree stands lighter"},
    {"instruction": "Give a short definition of the word.", "input": "ephemeral",
     "output": "Ephemeral means lasting for a very short time."},
    {"instruction": "Explain what a hash function is to someone new to programming.", "input": "",
     "output": "A hash function takes any piece of data, such as a word or a whole file, and turns it into a short "
               "fixed-size value called a hash. The same input always gives the same hash, and a tiny change to the "
               "input gives a very different hash. Programs use hashes to look things up quickly and to check that "
               "a file has not been changed."},
]

ORCA = [
    {"system_prompt": "You are an AI assistant. Think step by step and justify your steps.",
     "question": "A shop sells pencils in boxes of 12. A school needs 150 pencils. How many boxes must it buy?",
     "response": "Step 1: Divide the pencils needed by the pencils per box: 150 / 12 = 12.5.\n"
                 "Step 2: A shop cannot sell half a box, and 12 boxes give only 144 pencils, which is too few.\n"
                 "Step 3: Round up to the next whole box.\n\nThe school must buy 13 boxes (156 pencils)."},
    {"system_prompt": "",
     "question": "Is the following statement true or false? \"Every prime number is odd.\" Explain.",
     "response": "False. The number 2 is prime, because its only divisors are 1 and itself, and it is even. Every "
                 "other prime is odd, since any larger even number is divisible by 2."},
    {"system_prompt": "You are a helpful assistant who explains concepts simply.",
     "question": "Why do we have seasons on Earth?",
     "response": "Earth's axis is tilted by about 23.4 degrees relative to its orbit. As Earth goes around the sun, "
                 "first one hemisphere and then the other leans toward the sun. The hemisphere leaning toward the sun "
                 "gets more direct sunlight and longer days, which is summer there; the other hemisphere gets "
                 "slanted light and short days, which is winter. Distance from the sun changes little and is not the cause."},
    {"system_prompt": "You are an AI assistant that helps people find information. Provide a detailed answer so the user does not need to search elsewhere.",
     "question": "What does a thermometer measure, and how does a liquid thermometer work?",
     "response": "A thermometer measures temperature. In a liquid thermometer, a small amount of liquid (alcohol or, in "
                 "older instruments, mercury) sits in a bulb connected to a narrow glass tube. When the temperature "
                 "rises, the liquid expands and climbs the tube; when it falls, the liquid contracts. The tube is marked "
                 "with a scale, so the height of the liquid column can be read as a temperature."},
    {"system_prompt": "",
     "question": "Premise: \"A man is repairing a bicycle in his garage.\" Hypothesis: \"A man is outdoors riding a bicycle.\" Does the premise entail the hypothesis?",
     "response": "No. The premise places the man in his garage repairing the bicycle, while the hypothesis says he is "
                 "outdoors riding it. Both cannot describe the same moment, so the premise contradicts the hypothesis."},
    {"system_prompt": "You are a teacher. Given a task, explain in simple steps what the task is asking, then solve it.",
     "question": "Sort these words alphabetically: river, apple, mountain, cloud, bridge.",
     "response": "The task asks us to put the words in dictionary order by comparing their first letters, and later "
                 "letters when the first ones match.\n\nFirst letters: r, a, m, c, b. In alphabetical order: a, b, c, m, r.\n\n"
                 "Answer: apple, bridge, cloud, mountain, river."},
    {"system_prompt": "You are a helpful assistant. Answer accurately and say so when something cannot be known.",
     "question": "What will the weather be in Paris exactly one year from today?",
     "response": "That cannot be known. Weather forecasts lose their skill after about one to two weeks, because small "
                 "differences in today's conditions grow into large differences later. For a date a year ahead, only "
                 "the climate can be described: for example, the average temperature and rainfall for that time of year in Paris."},
    {"system_prompt": "You are an AI assistant. Think step by step and justify your steps.",
     "question": "If all bloops are razzies and all razzies are lazzies, are all bloops definitely lazzies?",
     "response": "Step 1: Every bloop is a razzie (first statement).\nStep 2: Every razzie is a lazzie (second statement).\n"
                 "Step 3: So any bloop, being a razzie, is also a lazzie.\n\nYes: all bloops are definitely lazzies."},
    {"system_prompt": "",
     "question": "Write a short, polite message declining an invitation to a dinner party on Saturday.",
     "response": "Thank you so much for inviting me to dinner on Saturday. I'm sorry that I can't make it this time, "
                 "as I already have plans that evening. I hope you all have a wonderful time, and I'd love to get "
                 "together soon."},
    {"system_prompt": "You are a concise assistant. Give the answer first, then a short justification.",
     "question": "Which is heavier, a kilogram of feathers or a kilogram of iron?",
     "response": "Neither: they weigh the same. Both are one kilogram; iron is denser, so the same mass takes up much less space."},
    {"system_prompt": "You are a programming assistant. Explain code clearly.",
     "question": "What does this Python expression return, and why? `sorted([3, 1, 2], reverse=True)[0]`",
     "response": "It returns 3. `sorted(..., reverse=True)` gives a new list in descending order, [3, 2, 1], and `[0]` "
                 "takes its first element, which is the largest value."},
    {"system_prompt": "You are a careful reader. Base every answer on the text you are given.",
     "question": "Text: \"The museum is open from 10 a.m. to 6 p.m. every day except Monday. Entry is free on the first "
                 "Sunday of each month.\" Question: Can a visitor enter for free on a Monday?",
     "response": "No. The museum is closed on Mondays, so no one can enter then; free entry applies only on the first "
                 "Sunday of each month."},
]

_ITEMS = ("apples", "notebooks", "tickets", "bottles of water", "bags of rice", "chairs", "light bulbs", "books")
_PEOPLE = ("Maria", "James", "Aiko", "Samuel", "Priya", "Tomás", "Fatima", "Liam")


def _shopping(rng: random.Random) -> dict:
    who, item = rng.choice(_PEOPLE), rng.choice(_ITEMS)
    n, price, paid = rng.randint(3, 19), rng.randint(2, 45), 0
    cost = n * price
    paid = (cost // 50 + 1) * 50
    q = f"{who} buys {n} {item} at ${price} each and pays with ${paid}. How much change should {who} get?"
    a = (f"First find the total cost: {n} × ${price} = ${cost}.\nThen subtract it from the amount paid: "
         f"${paid} − ${cost} = ${paid - cost}.\n\n{who} should get ${paid - cost} in change.")
    return {"instruction": q, "input": "", "output": a}


def _speed(rng: random.Random) -> dict:
    hours, speed = rng.randint(2, 9), rng.choice((40, 45, 50, 55, 60, 65, 70, 80, 90))
    km = hours * speed
    q = f"A train covers {km} km in {hours} hours at a constant speed. What is its speed, and how far does it go in {hours + 2} hours?"
    a = (f"Speed = distance / time = {km} km / {hours} h = {speed} km/h.\nIn {hours + 2} hours it travels "
         f"{speed} km/h × {hours + 2} h = {speed * (hours + 2)} km.\n\nThe speed is {speed} km/h and it covers "
         f"{speed * (hours + 2)} km in {hours + 2} hours.")
    return {"instruction": q, "input": "", "output": a}


def _percent(rng: random.Random) -> dict:
    base, pct = rng.randint(4, 60) * 10, rng.choice((5, 10, 15, 20, 25, 30, 40, 50))
    off = base * pct // 100
    q = f"A jacket costs ${base}. It is on sale for {pct}% off. What is the sale price?"
    a = (f"The discount is {pct}% of ${base}: {pct}/100 × {base} = ${off}.\nThe sale price is ${base} − ${off} = "
         f"${base - off}.")
    return {"instruction": q, "input": "", "output": a}


def _sort_numbers(rng: random.Random) -> dict:
    nums = rng.sample(range(1, 500), rng.randint(5, 9))
    return {"instruction": "Sort the numbers from smallest to largest and give their sum.",
            "input": ", ".join(map(str, nums)),
            "output": f"Sorted: {', '.join(map(str, sorted(nums)))}.\nSum: {' + '.join(map(str, sorted(nums)))} = {sum(nums)}."}


def arithmetic_records(rng: random.Random, n: int = 80) -> list[dict]:
    makers = (_shopping, _speed, _percent, _sort_numbers)
    return [makers[i % len(makers)](rng) for i in range(n)]
