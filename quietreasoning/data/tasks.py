"""Generated training tasks: arithmetic with chain of thought, ProsQA-style graph reasoning, and
PopQA-style entity facts. Every generator is a pure function of a numpy Generator (or a seed),
so the same seed gives the same tasks on any machine.

The formats copy the public benchmarks (see /work/shared/benchmarks/README.md) so a model trained
here can be measured there; this module never reads those files, it only writes the same format:

  multiplication  implicit-CoT (Deng et al.): `a * b||pp0 + pp1 ( sum ) + ... + ppk #### product`,
                  digits least-significant first and space separated
  addition        the same style: `a + b||x + y + c = s c carry , ... #### sum`
  ProsQA          Coconut's JSON objects (question, steps, answer and the graph: idx_to_symbol,
                  edges, root, target, neg_target), rendered as question\\n steps\\n ### answer
  PopQA           the published record fields (id, subj, prop, obj, *_id, aliases, uris, wiki
                  titles, s_pop / o_pop popularity, question, possible_answers), made-up entities

Each task becomes a `Document` whose `parts` mark roles: question, rationale, answer. The
rationale is exactly the chain of thought (what latent steps replace); separators that end the
question stay in it, and the marker that introduces the answer (` #### `, `### `, `A: `) is
part of the answer.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator, Sequence

import numpy as np

from quietreasoning.data.sources import Document

# share of each task in the reasoning bucket, and the sizes drawn (digits per operand)
REASONING_MIX = {"multiplication": 0.4, "prosqa": 0.4, "addition": 0.2}
MULTIPLICATION_DIGITS = (2, 3, 4, 5)
ADDITION_DIGITS = (2, 3, 4, 5, 6, 7, 8)


def _spaced(digits: Sequence[int]) -> str:
    return " ".join(str(d) for d in digits)


def _reversed_digits(value: int, width: int) -> list[int]:
    """`value` as `width` digits, least significant first (zero-padded)."""
    return [(value // 10 ** i) % 10 for i in range(width)]


def _value(digits: Sequence[int]) -> int:
    """The number whose digits, least significant first, are `digits`."""
    return sum(d * 10 ** i for i, d in enumerate(digits))


def _pick(rng: np.random.Generator, options: Sequence):
    """One of `options`, uniformly (rng.choice converts a tuple to an array on every call)."""
    return options[int(rng.random() * len(options))]


def _operand(rng: np.random.Generator, n: int) -> list[int]:
    """n random digits, least significant first, with a nonzero leading (most significant) digit."""
    return [int(d) for d in rng.integers(0, 10, n - 1)] + [int(rng.integers(1, 10))]


# ----------------------------------------------------------------------------- multiplication

def multiplication_parts(a: Sequence[int], b: Sequence[int]) -> tuple[str, str, str]:
    """(question, rationale, answer) of a * b in the implicit-CoT format; `a`, `b` are digit lists,
    least significant first. Partial product i is a * b[i] padded to len(a)+1 digits and shifted
    by i; after each partial product but the first and last comes the running sum, padded to
    len(a)+1+i digits; the product is padded to len(a)+len(b)."""
    va = _value(a)
    steps, total = [], 0
    for i, d in enumerate(b):
        step = _spaced([0] * i + _reversed_digits(va * d, len(a) + 1))
        total += va * d * 10 ** i
        if 0 < i < len(b) - 1:
            step += f" ( {_spaced(_reversed_digits(total, len(a) + 1 + i))} )"
        steps.append(step)
    question = f"{_spaced(a)} * {_spaced(b)}||"
    answer = f" #### {_spaced(_reversed_digits(total, len(a) + len(b)))}"
    return question, " + ".join(steps), answer


def parse_multiplication(line: str) -> tuple[list[int], list[int]]:
    """The operands (digit lists, least significant first) of an implicit-CoT multiplication line."""
    a, b = line.split("||", 1)[0].split(" * ")
    return [int(c) for c in a.split()], [int(c) for c in b.split()]


def multiplication_document(rng: np.random.Generator, n: int, bucket: str = "reasoning") -> Document:
    """One n x n digit multiplication with its chain of thought."""
    q, r, a = multiplication_parts(_operand(rng, n), _operand(rng, n))
    return Document.from_parts(bucket, "reasoning", (("question", q), ("rationale", r), ("answer", a)))


# ----------------------------------------------------------------------------- addition

def addition_parts(a: Sequence[int], b: Sequence[int]) -> tuple[str, str, str]:
    """(question, rationale, answer) of a + b in the same style: one step per digit position,
    `x + y + carry_in = digit c carry_out`, steps joined by ` , `; the sum padded to n+1 digits."""
    n = max(len(a), len(b))
    a_, b_ = list(a) + [0] * (n - len(a)), list(b) + [0] * (n - len(b))
    steps, carry = [], 0
    for x, y in zip(a_, b_):
        s = x + y + carry
        steps.append(f"{x} + {y} + {carry} = {s % 10} c {s // 10}")
        carry = s // 10
    question = f"{_spaced(a)} + {_spaced(b)}||"
    answer = f" #### {_spaced(_reversed_digits(_value(a) + _value(b), n + 1))}"
    return question, " , ".join(steps), answer


def addition_document(rng: np.random.Generator, n: int, bucket: str = "reasoning") -> Document:
    q, r, a = addition_parts(_operand(rng, n), _operand(rng, n))
    return Document.from_parts(bucket, "reasoning", (("question", q), ("rationale", r), ("answer", a)))


# ----------------------------------------------------------------------------- ProsQA-style graphs

PEOPLE = ("Alex", "Bella", "Carlos", "Dana", "Eli", "Farah", "Gus", "Hana", "Ivan", "Jade", "Kofi",
          "Lena", "Milo", "Nora", "Omar", "Pia", "Quinn", "Rosa", "Theo", "Uma", "Vera", "Wes",
          "Yara", "Zane")
_ONSETS = ("b", "bl", "br", "ch", "d", "dr", "f", "fl", "g", "gl", "gr", "j", "k", "l", "m", "n", "p",
           "pl", "qu", "r", "s", "sc", "sh", "sl", "sn", "sp", "st", "t", "th", "tr", "v", "w", "y", "z",
           "zh")
_VOWELS = ("a", "e", "i", "o", "u", "oo", "ee", "ai", "ou")
_CODAS = ("m", "r", "l", "n", "rm", "lm", "rn", "lk")


def nonsense_word(rng: np.random.Generator, ending: str = "pus") -> str:
    """A pronounceable made-up word, e.g. 'gloorpus'."""
    return _pick(rng, _ONSETS) + _pick(rng, _VOWELS) + _pick(rng, _CODAS) + ending


def _fact(subject: str, concept: str, is_person: bool) -> str:
    return f"{subject} is a {concept}." if is_person else f"Every {subject} is a {concept}."


def prosqa_example(rng: np.random.Generator) -> dict:
    """A ProsQA-style example: a DAG of 'is a' facts over made-up concepts, a person (root) whose
    concepts include `target` through a chain of 3-6 facts, and a `neg_target` the root cannot
    reach. Same keys as Coconut's prosqa JSON.

    How the answer stays derivable and unique: concepts split into the root's side R (levels
    1..L, edges only from level l to level l+1, so every path from the root to the target has
    exactly L facts) and the rest Q (edges to any later Q concept or into R). Nothing in R points
    into Q, so the root never reaches neg_target, which ends a chain from another person."""
    n_people = int(rng.choice([2, 3, 4], p=[0.55, 0.3, 0.15]))
    depth = int(rng.choice([3, 4, 5, 6], p=[0.4, 0.35, 0.15, 0.1]))
    neg_depth = int(rng.integers(2, 6))
    n_side = int(rng.integers(2, 7))  # extra concepts on the root's side (distractor branches)
    n_other = int(rng.integers(3, 10))  # extra concepts off the root's side
    n_concepts = depth + n_side + neg_depth + n_other
    concepts: list[str] = []
    while len(concepts) < n_concepts:
        word = nonsense_word(rng)
        if word not in concepts:
            concepts.append(word)
    people = [PEOPLE[i] for i in rng.choice(len(PEOPLE), n_people, replace=False)]
    names = people + concepts  # node ids: people first, then concepts
    root, other = 0, 1
    c = iter(range(n_people, n_people + n_concepts))
    path = [next(c) for _ in range(depth)]
    side = [next(c) for _ in range(n_side)]
    neg_path = [next(c) for _ in range(neg_depth)]
    rest = [next(c) for _ in range(n_other)]
    target, neg_target = path[-1], neg_path[-1]

    level = {v: k + 1 for k, v in enumerate(path)}
    level.update({v: int(rng.integers(1, depth + 1)) for v in side})
    # a random order of the Q concepts in which the chain to neg_target ascends
    slots = rng.permutation(neg_depth + n_other).tolist()
    q_order = dict(zip(neg_path, sorted(slots[:neg_depth])))
    q_order.update(zip(rest, slots[neg_depth:]))

    edges: list[tuple[int, int]] = []
    have: set[tuple[int, int]] = set()

    def add(u: int, v: int) -> None:
        if (u, v) not in have:
            have.add((u, v))
            edges.append((u, v))

    def allowed(u: int, v: int) -> bool:
        if u == v or v < n_people or u in (target, neg_target):
            return False
        if u == root:
            return level.get(v) == 1
        if u < n_people:
            return True
        if u in level:
            return level.get(v) == level[u] + 1
        return v in level or q_order[v] > q_order[u]

    for u, v in zip([root] + path, path):
        add(u, v)
    for u, v in zip([other] + neg_path, neg_path):
        add(u, v)
    for v in side:  # reachable from the root: a parent one level up
        ups = [u for u in [root] + path + side if allowed(u, v)]
        add(_pick(rng, ups), v)
    for v in rest:  # mentioned at least once: a parent among the other people and earlier Q nodes
        ups = [u for u in list(range(1, n_people)) + neg_path + rest if allowed(u, v)]
        add(_pick(rng, ups), v)
    want = int(len(names) * rng.uniform(1.4, 1.8))  # ProsQA: about 23 symbols and 36 facts
    for u, v in rng.integers(0, len(names), (20 * want, 2)).tolist():  # random extra facts
        if len(edges) >= want:
            break
        if allowed(u, v):
            add(u, v)

    # shuffle symbol indices and edge order so neither gives the answer away
    perm = rng.permutation(len(names)).tolist()  # old id -> new id
    idx_to_symbol = [""] * len(names)
    for old, new in enumerate(perm):
        idx_to_symbol[new] = names[old]
    edges = [edges[i] for i in rng.permutation(len(edges))]
    facts = [_fact(names[u], names[v], u < n_people) for u, v in edges]
    steps = _shortest_chain(facts, names[root], names[target])
    options = [names[target], names[neg_target]]
    if rng.random() < 0.5:
        options.reverse()
    facts = [facts[i] for i in rng.permutation(len(facts))]
    return {
        "question": " ".join(facts) + f" Is {names[root]} a {options[0]} or {options[1]}?",
        "answer": f"{names[root]} is a {names[target]}.",
        "steps": steps,
        "idx_to_symbol": idx_to_symbol,
        "edges": [[perm[u], perm[v]] for u, v in edges],
        "root": perm[root],
        "target": perm[target],
        "neg_target": perm[neg_target],
    }


def _parse_facts(facts: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """{subject: [(concept, fact sentence), ...]} from 'X is a Y.' / 'Every X is a Y.' sentences."""
    graph: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for fact in facts:
        body = fact.removeprefix("Every ").removesuffix(".")
        subject, concept = body.split(" is a ")
        graph[subject].append((concept, fact))
    return graph


def _shortest_chain(facts: Sequence[str], start: str, goal: str) -> list[str] | None:
    """The facts of a shortest 'is a' chain from `start` to `goal` (breadth first), or None."""
    graph = _parse_facts(facts)
    back: dict[str, tuple[str, str] | None] = {start: None}
    queue = collections.deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            chain = []
            while back[node] is not None:
                node, fact = back[node]
                chain.append(fact)
            return chain[::-1]
        for concept, fact in graph.get(node, ()):
            if concept not in back:
                back[concept] = (node, fact)
                queue.append(concept)
    return None


def prosqa_solve(question: str) -> tuple[str, list[str]] | None:
    """Answers a ProsQA question from its own facts: (answer sentence, chain of facts) for the
    one option the person reaches, or None if it reaches neither or both."""
    body, _, ask = question.rpartition(". Is ")
    facts = [s.strip() + "." for s in body.split(". ") if s.strip()]
    person, _, options = ask.removesuffix("?").partition(" a ")
    first, _, second = options.partition(" or ")
    chains = {o: _shortest_chain(facts, person, o) for o in (first, second)}
    found = [o for o, chain in chains.items() if chain]
    if len(found) != 1:
        return None
    return f"{person} is a {found[0]}.", chains[found[0]]


def prosqa_document(rng: np.random.Generator, bucket: str = "reasoning") -> Document:
    """A ProsQA-style example in Coconut's training layout: question\\n, one step per line, ### answer."""
    ex = prosqa_example(rng)
    return Document.from_parts(bucket, "reasoning", (
        ("question", ex["question"] + "\n"),
        ("rationale", "".join(step + "\n" for step in ex["steps"])),
        ("answer", "### " + ex["answer"]),
    ))


def reasoning_documents(rng: np.random.Generator, count: int, bucket: str = "reasoning") -> Iterator[Document]:
    """`count` reasoning tasks mixed by REASONING_MIX."""
    kinds = list(REASONING_MIX)
    cumulative = np.cumsum([REASONING_MIX[k] for k in kinds]) / sum(REASONING_MIX.values())
    for _ in range(count):
        kind = kinds[min(int(np.searchsorted(cumulative, rng.random(), side="right")), len(kinds) - 1)]
        if kind == "multiplication":
            yield multiplication_document(rng, _pick(rng, MULTIPLICATION_DIGITS), bucket)
        elif kind == "addition":
            yield addition_document(rng, _pick(rng, ADDITION_DIGITS), bucket)
        else:
            yield prosqa_document(rng, bucket)


# ----------------------------------------------------------------------------- PopQA-style facts
# Record fields and types follow PopQA's dataset card (Mallen et al. 2023, "When Not to Trust
# Language Models"; https://huggingface.co/datasets/akariasai/PopQA): id, subj, prop, obj,
# subj_id, prop_id, obj_id (int), s_aliases, o_aliases (JSON-encoded lists), s_uri, o_uri,
# s_wiki_title, o_wiki_title (str), s_pop, o_pop (int, monthly page views), question (str) and
# possible_answers (a JSON-encoded list of gold answers). Here every entity is made up, ids and
# URIs point nowhere (.invalid), and popularity is drawn long-tailed (log-normal), so exposure in
# training, and so accuracy, can be studied against s_pop as PopQA does.

# prop -> (prop_id, subject type, object type, question template); PopQA's relation types
# (religion left out). Object types: an entity type, or a word list below.
RELATIONS = {
    "occupation": (1, "person", "occupations", "What is {}'s occupation?"),
    "place of birth": (2, "person", "city", "In what city was {} born?"),
    "genre": (3, "work", "genres", "What genre is {}?"),
    "father": (4, "person", "person", "Who is the father of {}?"),
    "country": (5, "city", "country", "In what country is {}?"),
    "producer": (6, "work", "person", "Who was the producer of {}?"),
    "director": (7, "work", "person", "Who was the director of {}?"),
    "capital of": (8, "city", "country", "What is {} the capital of?"),
    "screenwriter": (9, "work", "person", "Who was the screenwriter for {}?"),
    "composer": (10, "work", "person", "Who was the composer of {}?"),
    "color": (11, "thing", "colors", "What color is {}?"),
    "sport": (12, "person", "sports", "What sport does {} play?"),
    "author": (13, "work", "person", "Who is the author of {}?"),
    "mother": (14, "person", "person", "Who is the mother of {}?"),
    "capital": (15, "country", "city", "What is the capital of {}?"),
}
WORDS = {
    "occupations": ("painter", "composer", "physician", "architect", "novelist", "chemist", "sculptor",
                    "journalist", "engineer", "botanist", "historian", "actor", "singer", "lawyer",
                    "astronomer", "photographer", "economist", "poet", "diplomat", "mathematician"),
    "genres": ("jazz", "folk music", "science fiction", "documentary film", "opera", "crime novel",
               "comedy film", "blues", "epic poetry", "thriller", "ambient music", "historical novel"),
    "colors": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "brown"),
    "sports": ("association football", "basketball", "tennis", "cricket", "rowing", "fencing",
               "volleyball", "handball", "cycling", "chess"),
}
# subject type -> relations it can have (each subject gets one to three of them)
SUBJECT_RELATIONS = {
    "person": ("occupation", "place of birth", "father", "mother", "sport"),
    "work": ("genre", "producer", "director", "screenwriter", "composer", "author"),
    "city": ("country",),
    "country": ("capital",),
    "thing": ("color",),
}
_WORK_NOUNS = ("Lantern", "Harbor", "Orchard", "Compass", "Winter", "Letter", "Garden", "Signal", "River")
_THING_NOUNS = ("stone", "blossom", "beetle", "banner", "ribbon", "shell", "feather")
_CITY_ENDINGS = ("ford", "burg", "ville", "port", "holm", "by", "mouth", "field")
_COUNTRY_ENDINGS = ("ia", "land", "ora", "ania", "mark")
_SURNAME_ENDINGS = ("son", "ley", "ick", "er", "ova", "ardt", "ini", "sky", "well")


def _popularity(rng: np.random.Generator) -> int:
    """Monthly page views, log-normal: median about 150, a long tail into the hundreds of thousands."""
    return int(np.exp(rng.normal(5.0, 2.0))) + 1


def popqa_records(seed: int, n_people: int = 1200) -> list[dict]:
    """A made-up world of entities and its PopQA-format question records (about 1.6 records per
    person; works, cities, countries and things scale with `n_people`)."""
    rng = np.random.default_rng([seed, 0x706F70])
    taken: set[str] = set()

    def fresh(make) -> str:
        while True:
            name = make()
            if name not in taken:
                taken.add(name)
                return name

    def cap(ending: str) -> str:
        return nonsense_word(rng, ending).capitalize()

    entities: dict[str, list[dict]] = {t: [] for t in ("person", "work", "city", "country", "thing")}
    next_id = iter(range(100_000, 10_000_000))

    def entity(kind: str, name: str, aliases: list[str]) -> dict:
        e = {"kind": kind, "id": next(next_id), "name": name, "aliases": aliases, "pop": _popularity(rng)}
        entities[kind].append(e)
        return e

    sizes = {"country": max(4, n_people // 20), "city": max(8, n_people // 4),
             "work": max(4, n_people // 3), "thing": max(4, n_people // 12)}
    for _ in range(sizes["country"]):
        entity("country", fresh(lambda: cap(_pick(rng, _COUNTRY_ENDINGS))), [])
    for _ in range(sizes["city"]):
        entity("city", fresh(lambda: cap(_pick(rng, _CITY_ENDINGS))), [])
    for _ in range(n_people):
        name = fresh(lambda: f"{cap('')} {cap(_pick(rng, _SURNAME_ENDINGS))}")
        first, last = name.split(" ")
        entity("person", name, [f"{first[0]}. {last}"])
    for _ in range(sizes["work"]):
        entity("work", fresh(lambda: f"The {cap('')} {_pick(rng, _WORK_NOUNS)}"), [])
    for _ in range(sizes["thing"]):
        entity("thing", fresh(lambda: f"the {nonsense_word(rng, '')} {_pick(rng, _THING_NOUNS)}"), [])

    # the world's facts, kept consistent: each city lies in one country, each country has a
    # capital among its cities, and 'capital of' holds exactly for capitals
    countries, cities = entities["country"], entities["city"]
    country_of = {c["id"]: _pick(rng, countries) for c in cities}
    capital = {}
    for k in range(len(countries)):
        capital[countries[k]["id"]] = cities[k]
        country_of[cities[k]["id"]] = countries[k]
    word_ids = {w: 1_000 + i for i, w in enumerate(w for ws in WORDS.values() for w in ws)}
    word_pop = {w: _popularity(rng) + 1000 for w in word_ids}

    def obj_for(prop: str, subj: dict) -> dict | str:
        kind = RELATIONS[prop][2]
        if kind in WORDS:
            return _pick(rng, WORDS[kind])
        if prop == "country":
            return country_of[subj["id"]]
        if prop == "capital":
            return capital[subj["id"]]
        pool = entities[kind]
        while True:
            o = _pick(rng, pool)
            if o is not subj:
                return o

    capitals = {c["id"] for c in capital.values()}
    records = []
    for kind in ("person", "work", "city", "country", "thing"):
        for subj in entities[kind]:
            props = list(SUBJECT_RELATIONS[kind])
            if kind == "city" and subj["id"] in capitals:
                props.append("capital of")
            chosen = [props[i] for i in rng.permutation(len(props))[: int(rng.integers(1, 4))]]
            for prop in sorted(chosen):
                prop_id, _, _, template = RELATIONS[prop]
                o = country_of[subj["id"]] if prop == "capital of" else obj_for(prop, subj)
                if isinstance(o, str):
                    o = {"id": word_ids[o], "name": o, "aliases": [], "pop": word_pop[o]}
                records.append({
                    "id": len(records), "subj": subj["name"], "prop": prop, "obj": o["name"],
                    "subj_id": subj["id"], "prop_id": prop_id, "obj_id": o["id"],
                    "s_aliases": json.dumps(subj["aliases"]), "o_aliases": json.dumps(o["aliases"]),
                    "s_uri": f"http://entity.quietreasoning.invalid/Q{subj['id']}",
                    "o_uri": f"http://entity.quietreasoning.invalid/Q{o['id']}",
                    "s_wiki_title": subj["name"], "o_wiki_title": o["name"],
                    "s_pop": subj["pop"], "o_pop": o["pop"],
                    "question": template.format(subj["name"]),
                    "possible_answers": json.dumps([o["name"], *o["aliases"]]),
                })
    return records


# a fact document is FACT_QUESTION then FACT_ANSWER, filled in; eval/popqa.py prompts the same way
FACT_QUESTION = "Q: {}\n"
FACT_ANSWER = "A: {}"


def fact_document(record: dict, bucket: str = "facts") -> Document:
    """A PopQA record as a question and its answer: 'Q: <question>\\n' then 'A: <obj>'."""
    return Document.from_parts(bucket, "facts", (("question", FACT_QUESTION.format(record["question"])),
                                                 ("answer", FACT_ANSWER.format(record["obj"]))))


def fact_documents(records: Sequence[dict], rng: np.random.Generator, count: int,
                   bucket: str = "facts") -> Iterator[Document]:
    """`count` distinct records as documents, drawn without replacement with probability
    proportional to sqrt(s_pop): a popular subject's facts are likely in the training data, a
    rare one's likely not (PopQA's long tail), and no document repeats (cleaning would drop it)."""
    if count > len(records):
        raise ValueError(f"asked for {count} fact documents from a world of {len(records)} records")
    weights = np.sqrt(np.array([r["s_pop"] for r in records], np.float64))
    for i in rng.choice(len(records), size=count, replace=False, p=weights / weights.sum()):
        yield fact_document(records[int(i)], bucket)
