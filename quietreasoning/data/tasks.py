"""Generated training tasks: arithmetic with chain of thought, ProsQA-style graph reasoning,
ProntoQA-style rule chains, multi-hop variable assignment, and PopQA-style entity facts. Every
generator is a pure function of a numpy Generator (or a seed), so the same seed gives the same
tasks on any machine.

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

Two more tasks exist for latent reasoning (not in the pretraining mix):
  prontoqa        'Every wern is liquid. ... Yara is a zeer. True or false: Yara is liquid.';
                  steps are the derived facts ('Yara is a gralm.', ..., 'Yara is liquid.'),
                  the answer True or False
  varassign       'y=7; k=y-1; v=k+2; z=y+2; v?'; steps are the path's values ('k=6', 'v=8'),
                  the answer the number ('8')

The latent trainer's interface, one for all five tasks (addition, multiplication, prosqa,
prontoqa, varassign):
  reasoning_example(task, rng, **difficulty)  one example: {task, question, steps, answer,
                  difficulty}. `steps` is the chain of thought as a list, each item one step the
                  Coconut curriculum can replace by latent thoughts; `difficulty` holds the knobs
                  it was drawn with. The implicit-CoT markers are dropped: addition is question
                  '5 9 + 7 8', steps ['5 + 7 + 0 = 2 c 1', '9 + 8 + 1 = 8 c 1'], answer '2 8 1'
                  (digits least significant first); multiplication's steps are its partial
                  products (with running sums); prosqa's are the facts of the path.
  reasoning_split(task, split, n, seed)  n distinct examples of a split:
                  train  the default difficulty below
                  test   the same difficulty, no question of train (for any seeds: a question
                         is held out when a stable hash of its text lands in bucket 0 of
                         HELD_OUT_BUCKETS; train keeps only the other buckets, test and ood
                         only that one)
                  ood    held out too, and harder: more digits or hops
  rationale_lexicon(task)  the tokens only chains of thought contain (defined there), for the
                  rationale-leakage metric

Default difficulty (DIFFICULTY; each example draws each knob uniformly from the listed values):
  task            knobs                                train and test          ood
  addition        digits per operand                   2, 3, 4                 5, 6
  multiplication  digits per operand                   2, 3, 4                 5
  prosqa          hops (facts on the path), people,    hops 3-5, 2 people,     hops 6-7, the
                  side (dead-end branches on the       side 1-2, other 1-2,    rest as train
                  person's side), other (concepts      extra 2-4
                  off it), extra (random facts)
  prontoqa        hops (rules applied), distractors    hops 1-3, distr. 1-3    hops 4-5, distr. 3-5
  varassign       hops (assignments on the path),      hops 1-4, distr. 0-3,   hops 5-6, distr.
                  distractors, values (range 0..v-1)   values 10               3-4, values 10
Sizes at train difficulty (question + steps + answer, mean characters): addition 72,
multiplication 69, varassign 43, prontoqa 173, prosqa 507 (ProsQA's own graphs are ~1,000).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from quietreasoning.config import ConfigError
from quietreasoning.data.sources import Document

# share of each task in the reasoning bucket, and the sizes drawn (digits per operand)
REASONING_MIX = {"multiplication": 0.4, "prosqa": 0.4, "addition": 0.2}
MULTIPLICATION_DIGITS = (2, 3, 4, 5)
ADDITION_DIGITS = (2, 3, 4, 5, 6, 7, 8)
# what joins the chain-of-thought steps of an implicit-CoT line (between `||` and ` #### `)
MULTIPLICATION_STEP_SEP = " + "
ADDITION_STEP_SEP = " , "


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
    return question, MULTIPLICATION_STEP_SEP.join(steps), answer


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
    return question, ADDITION_STEP_SEP.join(steps), answer


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


def nonsense_words(rng: np.random.Generator, count: int, ending: str = "pus", avoid: Sequence[str] = ()) -> list[str]:
    """`count` distinct made-up words, none of them in `avoid`."""
    words: list[str] = []
    while len(words) < count:
        word = nonsense_word(rng, ending)
        if word not in words and word not in avoid:
            words.append(word)
    return words


def _fact(subject: str, concept: str, is_person: bool) -> str:
    return f"{subject} is a {concept}." if is_person else f"Every {subject} is a {concept}."


def prosqa_example(rng: np.random.Generator, *, hops: int | None = None, people: int | None = None,
                   side: int | None = None, other: int | None = None, extra: int | None = None) -> dict:
    """A ProsQA-style example: a DAG of 'is a' facts over made-up concepts, a person (root) whose
    concepts include `target` through a chain of `hops` facts, and a `neg_target` the root cannot
    reach. Same keys as Coconut's prosqa JSON. Sizes: `people` persons (>= 2), `side` distractor
    concepts on the root's side (reachable dead-end branches), `other` concepts off it, and
    `extra` random facts beyond the ones that connect every symbol; each left None is drawn like
    ProsQA's (3-6 hops, 2-4 people, 2-6 side, 3-9 other concepts, 1.4-1.8 facts per symbol).

    How the answer stays derivable and unique: concepts split into the root's side R (levels
    1..L, edges only from level l to level l+1, so every path from the root to the target has
    exactly L facts) and the rest Q (edges to any later Q concept or into R). Nothing in R points
    into Q, so the root never reaches neg_target, which ends a chain from another person."""
    if (hops is not None and hops < 1) or (people is not None and people < 2) or min(side or 0, other or 0,
                                                                                      extra or 0) < 0:
        raise ConfigError(f"prosqa: hops={hops} people={people} side={side} other={other} extra={extra}; "
                          f"need hops >= 1, people >= 2 and side, other, extra >= 0")
    n_people = int(rng.choice([2, 3, 4], p=[0.55, 0.3, 0.15])) if people is None else people
    depth = int(rng.choice([3, 4, 5, 6], p=[0.4, 0.35, 0.15, 0.1])) if hops is None else hops
    neg_depth = int(rng.integers(2, 6))
    n_side = int(rng.integers(2, 7)) if side is None else side  # extra concepts on the root's side
    n_other = int(rng.integers(3, 10)) if other is None else other  # extra concepts off the root's side
    n_concepts = depth + n_side + neg_depth + n_other
    concepts = nonsense_words(rng, n_concepts)
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
    # ProsQA: about 23 symbols and 36 facts
    want = int(len(names) * rng.uniform(1.4, 1.8)) if extra is None else len(edges) + extra
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


# ----------------------------------------------------------------------------- ProntoQA-style rule chains
# After ProntoQA (Saparov & He 2023, "Language Models Are Greedy Reasoners"): rules over made-up
# concepts, one fact about a person, and a true/false question about one of the person's properties.

PROPERTIES = ("fast", "cold", "shy", "sour", "loud", "bright", "soft", "wet", "kind", "dull", "happy", "small",
              "red", "opaque", "bitter", "liquid", "wooden", "metallic", "fruity", "spicy")


def prontoqa_example(rng: np.random.Generator, hops: int, distractors: int) -> dict:
    """{question, steps, answer}: `hops` rules lead from the person's concept to a property.

    The chain: '<person> is a c1.' and the rules c1 -> c2 -> ... -> c_hops -> (not) <property>, so
    the person is (or is not) <property> after `hops` rule applications. Each application derives
    one fact ('Alex is a c2.', ..., 'Alex is not fast.'); those facts are the steps. The question
    asks 'True or false: <person> is (not) <property>.', each phrasing half the time, so True and
    False are equally likely. Distractors are one rule each: the first gives a decoy concept the
    opposite property (so both polarities appear and only the chain tells which holds), later ones
    alternately lengthen the decoy's chain backwards (up to `hops` concepts, so it looks like the
    real one) and hang dead-end concepts off either chain. The person reaches no decoy concept and
    nothing follows from a dead end, so exactly one polarity is derivable."""
    if hops < 1 or distractors < 0:
        raise ConfigError(f"prontoqa: hops={hops} distractors={distractors}; need hops >= 1 and distractors >= 0")
    person, prop = _pick(rng, PEOPLE), _pick(rng, PROPERTIES)
    words = nonsense_words(rng, hops + distractors, ending="", avoid=PROPERTIES)
    chain, fresh = words[:hops], iter(words[hops:])
    positive = bool(rng.random() < 0.5)

    def has(subject: str, yes: bool) -> str:
        return f"{subject} is {'' if yes else 'not '}{prop}."

    rules = [f"Every {u} is a {v}." for u, v in zip(chain, chain[1:])] + ["Every " + has(chain[-1], positive)]
    decoy: list[str] = []
    for i in range(distractors):
        word = next(fresh)
        if i == 0:
            rules.append("Every " + has(word, not positive))
            decoy.append(word)
        elif i % 2 == 1 and len(decoy) < hops:
            rules.append(f"Every {word} is a {decoy[-1]}.")
            decoy.append(word)
        else:
            rules.append(f"Every {_pick(rng, chain + decoy)} is a {word}.")
    asked = bool(rng.random() < 0.5)
    rules = [rules[i] for i in rng.permutation(len(rules))]
    return {
        "question": " ".join(rules) + f" {person} is a {chain[0]}. True or false: " + has(person, asked),
        "steps": [f"{person} is a {c}." for c in chain[1:]] + [has(person, positive)],
        "answer": "True" if asked == positive else "False",
    }


# ----------------------------------------------------------------------------- variable assignment
# A straight-line program of one-letter variables, each the value of a constant or of an earlier
# variable and one operation: 'a=3; b=a+2; c=b*2; c?'. Values stay in [0, values): with the
# default 10 every number is one digit, each step is one entry of the +, -, * tables of single
# digits (a few hundred facts a tiny model can learn), and no step wraps around, so no modular
# convention has to be inferred; the difficulty is the number of hops, not the arithmetic.

VARIABLES = "abcdefghijklmnopqrstuvwxyz"


def _operation(rng: np.random.Generator, v: int, values: int) -> tuple[str, int, int]:
    """(op, k, v op k): one of `+k` (k >= 1), `-k` (k >= 1), `*k` (k >= 2) whose result stays in
    [0, values); the operation is drawn among those possible, then k uniformly."""
    ops = [op for op, ok in (("+", v < values - 1), ("-", v > 0), ("*", 0 < v and 2 * v < values)) if ok]
    op = _pick(rng, ops)
    if op == "+":
        k = int(rng.integers(1, values - v))
        return op, k, v + k
    if op == "-":
        k = int(rng.integers(1, v + 1))
        return op, k, v - k
    k = int(rng.integers(2, (values - 1) // v + 1))
    return op, k, v * k


def varassign_example(rng: np.random.Generator, hops: int, distractors: int, values: int = 10) -> dict:
    """{question, steps, answer}: the value of the last of a chain of `hops` assignments.

    The path: a constant, then `hops` variables each computed from the one before ('b=a+2'); the
    question names the last one ('c?'). Steps: each variable on the path after the constant with
    its value ('b=5', 'c=7'); the answer is the last value. Distractors are extra assignments, each
    a constant or a branch off any variable defined so far, placed at a random point after what
    they read; no path variable reads one. Names are distinct letters in random order, so neither
    a name nor a position gives the path away."""
    if hops < 1 or distractors < 0 or values < 2 or hops + 1 + distractors > len(VARIABLES):
        raise ConfigError(f"varassign: hops={hops} distractors={distractors} values={values}; need hops >= 1, "
                          f"distractors >= 0, values >= 2 and hops + 1 + distractors <= {len(VARIABLES)} variables")
    names = [VARIABLES[i] for i in rng.permutation(len(VARIABLES))[: hops + 1 + distractors]]
    path = names[: hops + 1]
    value = {path[0]: int(rng.integers(values))}
    program = [(path[0], str(value[path[0]]))]  # (variable, expression), in program order
    for u, v in zip(path, path[1:]):
        op, k, value[v] = _operation(rng, value[u], values)
        program.append((v, f"{u}{op}{k}"))
    for x in names[hops + 1:]:
        source = _pick(rng, [None, *value])  # a constant, or a branch off a variable defined so far
        if source is None:
            value[x] = int(rng.integers(values))
            expression, first = str(value[x]), 0
        else:
            op, k, value[x] = _operation(rng, value[source], values)
            expression, first = f"{source}{op}{k}", 1 + [y for y, _ in program].index(source)
        program.insert(int(rng.integers(first, len(program) + 1)), (x, expression))
    return {
        "question": "; ".join(f"{x}={e}" for x, e in program) + f"; {path[-1]}?",
        "steps": [f"{v}={value[v]}" for v in path[1:]],
        "answer": str(value[path[-1]]),
    }


# ----------------------------------------------------------------------------- one interface for the latent trainer

def implicit_cot_example(line: str, step_separator: str) -> dict:
    """{question, steps, answer} of an implicit-CoT line `question||step<sep>step... #### answer`."""
    question, _, rest = line.partition("||")
    rationale, _, answer = rest.partition(" #### ")
    return {"question": question, "steps": rationale.split(step_separator), "answer": answer}


def _digits_checked(task: str, digits: int) -> int:
    if digits < 1:
        raise ConfigError(f"{task}: digits={digits}; need digits >= 1")
    return digits


def _addition(rng: np.random.Generator, digits: int) -> dict:
    n = _digits_checked("addition", digits)
    return implicit_cot_example("".join(addition_parts(_operand(rng, n), _operand(rng, n))), ADDITION_STEP_SEP)


def _multiplication(rng: np.random.Generator, digits: int) -> dict:
    n = _digits_checked("multiplication", digits)
    line = "".join(multiplication_parts(_operand(rng, n), _operand(rng, n)))
    return implicit_cot_example(line, MULTIPLICATION_STEP_SEP)


def _prosqa(rng: np.random.Generator, **sizes: int) -> dict:
    ex = prosqa_example(rng, **sizes)
    return {"question": ex["question"], "steps": ex["steps"], "answer": ex["answer"]}


GENERATORS = {"addition": _addition, "multiplication": _multiplication, "prosqa": _prosqa,
              "prontoqa": prontoqa_example, "varassign": varassign_example}
SPLITS = ("train", "test", "ood")
# task -> {"train" (test draws the same), "ood"} -> {knob: values drawn uniformly per example}
DIFFICULTY = {
    "addition": {"train": {"digits": (2, 3, 4)}, "ood": {"digits": (5, 6)}},
    "multiplication": {"train": {"digits": (2, 3, 4)}, "ood": {"digits": (5,)}},
    "prosqa": {"train": {"hops": (3, 4, 5), "people": (2,), "side": (1, 2), "other": (1, 2), "extra": (2, 3, 4)},
               "ood": {"hops": (6, 7), "people": (2,), "side": (1, 2), "other": (1, 2), "extra": (2, 3, 4)}},
    "prontoqa": {"train": {"hops": (1, 2, 3), "distractors": (1, 2, 3)},
                 "ood": {"hops": (4, 5), "distractors": (3, 4, 5)}},
    "varassign": {"train": {"hops": (1, 2, 3, 4), "distractors": (0, 1, 2, 3), "values": (10,)},
                  "ood": {"hops": (5, 6), "distractors": (3, 4), "values": (10,)}},
}
HELD_OUT_BUCKETS = 5  # a question is held out when its hash lands in bucket 0 of 5: a fifth of each task
LEXICON_SAMPLE = 300  # examples of each split (seed 0) the rationale lexicon is read from


def split_difficulty(task: str, split: str) -> dict[str, tuple[int, ...]]:
    """The knobs a split draws from: {knob: values}; `test` draws what `train` draws."""
    if task not in DIFFICULTY:
        raise ConfigError(f"reasoning task '{task}' is unknown; use one of {', '.join(DIFFICULTY)}")
    if split not in SPLITS:
        raise ConfigError(f"split '{split}' of reasoning task {task} is unknown; use one of {', '.join(SPLITS)}")
    return DIFFICULTY[task]["ood" if split == "ood" else "train"]


def reasoning_example(task: str, rng: np.random.Generator, **difficulty) -> dict:
    """One example of `task`: {task, question, steps, answer, difficulty}. Each knob is an int or a
    sequence of ints (one drawn uniformly); a knob not given is drawn from the train split's values.
    `difficulty` in the result holds the ints drawn."""
    knobs = split_difficulty(task, "train")
    unknown = sorted(set(difficulty) - set(knobs))
    if unknown:
        raise ConfigError(f"difficulty {', '.join(unknown)} is unknown for reasoning task {task}; "
                          f"use {', '.join(knobs)}")
    drawn = {}
    for knob, default in knobs.items():
        choice = difficulty.get(knob, default)
        drawn[knob] = int(_pick(rng, tuple(choice) if isinstance(choice, (tuple, list, range)) else (choice,)))
    return {"task": task, **GENERATORS[task](rng, **drawn), "difficulty": drawn}


def is_held_out(question: str) -> bool:
    """True for the fifth of all questions that only `test` and `ood` may use (a stable hash of
    the text, so the split of a question never depends on the seed or on what else was drawn)."""
    digest = hashlib.blake2b(question.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELD_OUT_BUCKETS == 0


def reasoning_split(task: str, split: str, n: int, seed: int, progress: bool = False) -> list[dict]:
    """`n` distinct examples of `task` drawn with `split`'s difficulty (see the module docstring).
    `train` keeps only questions outside the held-out buckets, `test` and `ood` only questions
    inside them, so no test or ood question is ever a train question, for any seeds. Examples are
    drawn in order from a generator seeded by (seed, task, split): the first k of n are the k."""
    difficulty = split_difficulty(task, split)
    if n < 0:
        raise ConfigError(f"reasoning split {task}/{split}: n={n}; ask for n >= 0 examples")
    rng = np.random.default_rng([seed, zlib.crc32(f"{task}:{split}".encode())])
    held_out = split != "train"
    out: list[dict] = []
    seen: set[str] = set()
    draws = 50 * n + 1000
    with tqdm(total=n, disable=not progress, desc=f"{task} {split}", unit="ex") as bar:
        for _ in range(draws):
            if len(out) == n:
                return out
            ex = reasoning_example(task, rng, **difficulty)
            if ex["question"] in seen or is_held_out(ex["question"]) != held_out:
                continue
            seen.add(ex["question"])
            out.append(ex)
            bar.update()
    if len(out) == n:
        return out
    raise ConfigError(f"reasoning split {task}/{split}: only {len(out)} distinct questions in {draws} draws; "
                      f"ask for fewer than n={n} or widen DIFFICULTY['{task}']")


@functools.cache
def rationale_lexicon(task: str) -> frozenset[str]:
    """The tokens of `task` that only chains of thought contain: a token (a maximal run of
    non-space characters, `str.split()`) is in the lexicon when it occurs in some step of the
    first LEXICON_SAMPLE examples of each split (train, test, ood; seed 0) and in no question
    and no answer of them. A generated token in this set is rationale leaking into an answer.
    Addition gives {'=', 'c'}, multiplication {'(', ')'}, varassign the 'x=v' step tokens; the
    steps of prosqa and prontoqa restate facts in the question's own words, so their lexicon is
    empty and leakage there has to be judged otherwise (e.g. anything but the answer's tokens)."""
    in_steps: set[str] = set()
    elsewhere: set[str] = set()
    for split in SPLITS:
        for ex in reasoning_split(task, split, LEXICON_SAMPLE, seed=0):
            in_steps.update(token for step in ex["steps"] for token in step.split())
            elsewhere.update(ex["question"].split())
            elsewhere.update(ex["answer"].split())
    return frozenset(in_steps - elsewhere)


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
