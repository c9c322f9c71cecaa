"""Write the bundled ShareGPT DPO sample: deterministic, coherent, offline.

    python data/sample/make_sample.py            # rewrites data/sample/sharegpt_dpo_sample.json

The real data (llamafactory/DPO-En-Zh-20k) pairs a preferred answer with a dispreferred one, and the recipe keeps pairs
whose rejected answer is much longer. This sample imitates that at a size a 2-core CPU trains on in minutes:
- questions with checkable answers (facts, capitals, arithmetic, word meanings), English and some Chinese;
- some system prompts, including ones that demand long answers (as the real data has);
- some multi-turn conversations (a name given in the first turn, as in the recipe's "Sponge" example);
- three kinds of pair, so the length filters have something to separate:
    about 1/4  concise chosen vs a padded rejected (rejected >= 2x chosen),
    about 1/4  chosen with one remark vs rejected with a few more (1.2x <= ratio < 2x),
    about 1/2  a right answer vs a wrong one of about the same length (ratio < 1.2).
"""
import json
import random
from pathlib import Path

SEED = 7
N_RECORDS = 480
OUT = Path(__file__).with_name("sharegpt_dpo_sample.json")

FACTS = [
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system.", "Saturn is the largest planet in our solar system."),
    ("How many days are in a leap year?", "A leap year has 366 days.", "A leap year has 365 days."),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air.", "Plants take in oxygen from the air."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level.", "Water boils at 90 degrees Celsius at sea level."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.", "Charles Dickens wrote Romeo and Juliet."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.", "The chemical symbol for gold is Ag."),
    ("How many continents are there?", "There are seven continents.", "There are five continents."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal.", "The lion is the fastest land animal."),
    ("How many legs does a spider have?", "A spider has eight legs.", "A spider has six legs."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius.", "Water freezes at 10 degrees Celsius."),
    ("Which planet is known as the red planet?", "Mars is known as the red planet.", "Venus is known as the red planet."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean.", "The Atlantic Ocean is the largest ocean."),
    ("How many hours are in a day?", "There are 24 hours in a day.", "There are 20 hours in a day."),
    ("What do bees make?", "Bees make honey.", "Bees make milk."),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain in the world.", "Mount Fuji is the tallest mountain in the world."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour.", "There are 100 minutes in an hour."),
    ("What is the main language spoken in Brazil?", "The main language of Brazil is Portuguese.", "The main language of Brazil is Spanish."),
    ("What is the hardest natural material?", "Diamond is the hardest natural material.", "Iron is the hardest natural material."),
    ("Which organ pumps blood through the body?", "The heart pumps blood through the body.", "The lungs pump blood through the body."),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth.", "Sirius is the closest star to Earth."),
    ("How many sides does a triangle have?", "A triangle has three sides.", "A triangle has four sides."),
    ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green.", "Mixing blue and yellow gives purple."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa.", "Pablo Picasso painted the Mona Lisa."),
    ("What is the smallest prime number?", "The smallest prime number is 2.", "The smallest prime number is 1."),
    ("How many strings does a standard guitar have?", "A standard guitar has six strings.", "A standard guitar has eight strings."),
]

CAPITALS = [
    ("France", "Paris", "Lyon"), ("Japan", "Tokyo", "Osaka"), ("Italy", "Rome", "Milan"), ("Spain", "Madrid", "Barcelona"),
    ("Germany", "Berlin", "Munich"), ("Canada", "Ottawa", "Toronto"), ("Australia", "Canberra", "Sydney"),
    ("Egypt", "Cairo", "Alexandria"), ("Kenya", "Nairobi", "Mombasa"), ("Peru", "Lima", "Cusco"),
    ("Norway", "Oslo", "Bergen"), ("Turkey", "Ankara", "Istanbul"), ("Brazil", "Brasilia", "Rio de Janeiro"),
    ("India", "New Delhi", "Mumbai"), ("Mexico", "Mexico City", "Cancun"), ("Greece", "Athens", "Sparta"),
]

WORDS = [
    ("big", "large"), ("happy", "glad"), ("fast", "quick"), ("smart", "clever"), ("small", "tiny"),
    ("begin", "start"), ("end", "finish"), ("angry", "mad"), ("easy", "simple"), ("rich", "wealthy"),
]

ZH_FACTS = [
    ("中国的首都是哪里？", "中国的首都是北京。", "中国的首都是上海。"),
    ("一年有几个月？", "一年有十二个月。", "一年有十个月。"),
    ("水在多少度结冰？", "水在零摄氏度结冰。", "水在十摄氏度结冰。"),
    ("太阳系最大的行星是什么？", "太阳系最大的行星是木星。", "太阳系最大的行星是土星。"),
    ("一个星期有几天？", "一个星期有七天。", "一个星期有五天。"),
    ("熊猫主要吃什么？", "熊猫主要吃竹子。", "熊猫主要吃鱼。"),
    ("长城在哪个国家？", "长城在中国。", "长城在日本。"),
    ("三角形有几条边？", "三角形有三条边。", "三角形有四条边。"),
]

EN_ASK = ["{q}", "Quick question: {q}", "Can you tell me this? {q}", "I was wondering. {q}", "Please answer briefly. {q}"]
EN_REMARKS = [
    "This is a well known fact.", "You can check it in any encyclopedia.", "Many students learn this in school.",
    "It is easy to remember.", "This has been known for a long time.",
]
EN_FILLERS = [
    "That is a great question and I am happy to help you with it.",
    "Let me explain this in a little more detail so that everything is clear.",
    "It is worth keeping the broader context in mind when thinking about this.",
    "Many people find this topic interesting, and there is a lot more to say about it.",
    "There are several points to consider before we get to the final answer.",
    "To put it another way, the answer follows from some basic facts.",
    "I hope this explanation helps you understand the topic better.",
    "Feel free to ask me if you have any more questions about this.",
    "In summary, the answer above is the one you are looking for.",
    "It is always a good idea to double check facts like this one.",
]
ZH_REMARKS = ["这是一个常识。", "这个问题很容易记住。", "很多学生在学校学过这个。"]
ZH_FILLERS = [
    "这是一个很好的问题，我很乐意帮助你。",
    "让我更详细地解释一下，这样一切都会很清楚。",
    "在思考这个问题时，最好考虑更广泛的背景。",
    "很多人都对这个话题感兴趣，关于它还有很多可以说的。",
    "希望这个解释能帮助你更好地理解这个话题。",
    "如果你还有其他问题，请随时问我。",
    "总而言之，上面的答案就是你要找的答案。",
]
SYSTEMS_PLAIN = ["You are a helpful assistant.", "You are a friendly assistant that answers questions."]
SYSTEMS_LONG = [
    "Always answer in great detail, explaining your reasoning at length.",
    "You are a thorough tutor. Give long, complete explanations with background for every answer.",
]
NAMES = ["Sponge", "Alice", "Bob", "Mei", "Omar", "Lena", "Ravi", "Tom"]


def question(rng, i):
    """(question, right answer, wrong answer, is_chinese): cycles through the kinds, varied by `i`."""
    kind = i % 8
    if kind == 7:
        q, a, w = ZH_FACTS[(i // 8) % len(ZH_FACTS)]
        return q, a, w, True
    if kind in (0, 1):
        q, a, w = FACTS[rng.randrange(len(FACTS))]
    elif kind in (2, 3):
        country, cap, wrong = CAPITALS[rng.randrange(len(CAPITALS))]
        q, a, w = f"What is the capital of {country}?", f"The capital of {country} is {cap}.", f"The capital of {country} is {wrong}."
    elif kind in (4, 5):
        x, y = rng.randint(2, 60), rng.randint(2, 40)
        q, a, w = f"What is {x} plus {y}?", f"{x} plus {y} is {x + y}.", f"{x} plus {y} is {x + y + rng.choice([-2, -1, 1, 3])}."
    else:
        word, syn = WORDS[rng.randrange(len(WORDS))]
        q, a, w = f"Give me a word that means {word}.", f"A word that means {word} is {syn}.", f"A word that means {word} is slow."
    return rng.choice(EN_ASK).format(q=q), a, w, False


def padded(rng, core, fillers, n):
    """core answer surrounded by n filler sentences: the verbose style DPO should learn to avoid."""
    picked = rng.sample(fillers, min(n, len(fillers)))
    sep = "" if fillers is ZH_FILLERS else " "
    return sep.join([picked[0], core] + picked[1:]) if picked else core


def make_pair(rng, kind, right, wrong, zh):
    fillers, remarks = (ZH_FILLERS, ZH_REMARKS) if zh else (EN_FILLERS, EN_REMARKS)
    sep = "" if zh else " "
    if kind == "long":  # concise vs padded: ratio well above 2
        return right, padded(rng, right, fillers, rng.randint(3, 6))
    if kind == "medium":  # one remark vs a remark and a filler or two: ratio between 1.2 and 2
        chosen = right + sep + rng.choice(remarks)
        for n in (2, 1):
            rejected = padded(rng, right, fillers, n)
            if 1.2 <= len(rejected) / len(chosen) < 2:
                return chosen, rejected
        return chosen, right + sep + rng.choice(remarks) + sep + rng.choice(fillers)
    # "same": right vs wrong at about the same length, both sometimes padded alike
    n = rng.choice([0, 0, 1, 2, 3])
    picked = rng.sample(fillers, n)
    return sep.join(picked[:1] + [right] + picked[1:]), sep.join(picked[:1] + [wrong] + picked[1:])


def main():
    rng = random.Random(SEED)
    records = []
    for i in range(N_RECORDS):
        q, right, wrong, zh = question(rng, i)
        kind = ["long", "medium", "same", "same"][rng.randrange(4)]
        chosen, rejected = make_pair(rng, kind, right, wrong, zh)
        convs = []
        r = rng.random()
        if r < 0.10 and not zh:
            convs.append({"from": "system", "value": rng.choice(SYSTEMS_LONG)})
        elif r < 0.20:
            convs.append({"from": "system", "value": rng.choice(SYSTEMS_PLAIN)})
        if rng.random() < 0.12 and not zh:
            name = rng.choice(NAMES)
            convs.append({"from": "human", "value": f"Hi, my name is {name}."})
            convs.append({"from": "gpt", "value": f"Nice to meet you, {name}! How can I help you today?"})
        convs.append({"from": "human", "value": q})
        records.append({
            "conversations": convs,
            "chosen": {"from": "gpt", "value": chosen},
            "rejected": {"from": "gpt", "value": rejected},
        })
    OUT.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    ratios = [len(r["rejected"]["value"]) / len(r["chosen"]["value"]) for r in records]
    print(f"wrote {len(records)} records to {OUT}")
    print(f"share with rejected >= 1.2x chosen: {sum(x >= 1.2 for x in ratios) / len(ratios):.2f}")
    print(f"share with rejected >= 2x chosen:   {sum(x >= 2 for x in ratios) / len(ratios):.2f}")


if __name__ == "__main__":
    main()
