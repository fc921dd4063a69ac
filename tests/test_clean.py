"""Cleaning: duplicates, language, toxicity and length filters drop what they should, keep code
and math, count every decision per bucket, and decide the same way twice."""

import random

import pytest

from quietreasoning.config import DataError
from quietreasoning.data.clean import REASONS, Cleaner, prose_only, rank_languages, read_blocklist
from quietreasoning.data.sources import Document
from helpers import micro_config


VOCAB = ("river stone window garden morning letter bridge engine market silver lantern harbor "
         "meadow candle winter signal forest pocket ladder orchard copper valley thunder basket "
         "whistle marble cabinet feather compass tunnel").split()

ENGLISH = ("The committee met on Tuesday to review the budget for the coming year. After a long "
           "discussion about road repairs and the new library, the members agreed to postpone the "
           "decision until more residents had been consulted about their priorities. The chair thanked "
           "everyone for coming.")
FRENCH = ("Le comité s'est réuni mardi pour examiner le budget de l'année prochaine. Après une longue "
          "discussion sur la réparation des routes et la nouvelle bibliothèque, les membres ont décidé "
          "de reporter la décision jusqu'à ce que les habitants soient consultés. La présidente a remercié "
          "tout le monde.")
GERMAN = ("Der Ausschuss traf sich am Dienstag, um den Haushalt für das kommende Jahr zu prüfen. Nach "
          "einer langen Diskussion über Straßenreparaturen und die neue Bibliothek beschlossen die "
          "Mitglieder, die Entscheidung zu verschieben, bis die Bürger befragt worden waren. Die Vorsitzende "
          "dankte allen.")
SPANISH = ("El comité se reunió el martes para revisar el presupuesto del próximo año. Después de una "
           "larga discusión sobre la reparación de las calles y la nueva biblioteca, los miembros "
           "decidieron aplazar la decisión hasta consultar a los vecinos. La presidenta agradeció a todos "
           "su asistencia.")
CODE = '''def moving_average(values, window):
    """Mean of each run of `window` consecutive values."""
    total = sum(values[:window])
    out = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        out.append(total / window)
    return out
'''
LATEX = (r"Let $f(x) = \sum_{k=0}^{n} a_k x^k$ with $a_k \in \mathbb{R}$. Then "
         r"$$\int_0^1 f(x)\,dx = \sum_{k=0}^{n} \frac{a_k}{k+1},$$ and for $n = 2$ we get "
         r"$\frac{a_0}{1} + \frac{a_1}{2} + \frac{a_2}{3}$. Hence the mean value of the polynomial "
         r"on the unit interval is a weighted sum of its coefficients.")
ARITHMETIC = "12 * 7 + 36 / 4 - 5 = 88"


def prose(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(n_words))


def doc(text, kind="prose", bucket="prose"):
    return Document(bucket=bucket, kind=kind, text=text)


def test_exact_and_near_duplicates_are_dropped_and_counted():
    base = prose(200, seed=1)
    words = base.split()
    words[100] = "zeppelin"  # one word changed in 200
    near = " ".join(words)
    exact = "  " + base.upper().replace(" ", "\n ") + "\n"  # same text up to case and whitespace
    other = prose(200, seed=2)
    cleaner = Cleaner()
    assert [cleaner.keep(doc(t, kind="facts", bucket="facts")) for t in (base, exact, near, other)] == [
        None, "exact_duplicate", "near_duplicate", None]
    assert cleaner.stats["facts"]["dropped"]["exact_duplicate"] == 1
    assert cleaner.stats["facts"]["dropped"]["near_duplicate"] == 1
    # long documents are sketched by a bottom-k sample of their shingles: still caught
    long = prose(3000, seed=4)
    edited = long.replace(" ", " thunderous ", 1)
    other_long = prose(3000, seed=5)
    assert [cleaner.keep(doc(t, kind="facts", bucket="facts")) for t in (long, edited, other_long)] == [
        None, "near_duplicate", None]


def test_non_english_prose_is_dropped_as_language_and_english_kept():
    cleaner = Cleaner()
    assert cleaner.keep(doc(ENGLISH)) is None
    for text in (FRENCH, GERMAN, SPANISH):
        assert len(prose_only(text)) > 200  # long enough for the lang_threshold rule
        assert cleaner.keep(doc(text)) == "language"
    assert cleaner.stats["prose"]["dropped"]["language"] == 3
    assert Cleaner(lang_threshold=1.0).keep(doc(ENGLISH)) == "language"  # the threshold is what decides


def test_short_prose_needs_english_to_rank_first_not_the_threshold():
    short_english = ("Create an image with NAME.\nValid resource names: data, format, file, gamma, "
                     "height, palette, width.")
    ranked = rank_languages(short_english)
    assert ranked[0][0] == "en" and ranked[0][1] < 0.9  # a full-length text this unsure would go
    cleaner = Cleaner()
    assert cleaner.keep(doc(short_english)) is None
    assert cleaner.keep(doc("Nous sommes allés au marché ce matin avec ma sœur.")) == "language"
    assert cleaner.keep(doc("Ich habe heute leider keine Zeit, aber morgen vielleicht.")) == "language"
    assert cleaner.keep(doc("Paris is the capital of France.")) is None  # under 40 letters: unjudged


def test_code_and_math_are_kept():
    cleaner = Cleaner()
    assert cleaner.keep(doc(CODE, kind="code", bucket="code")) is None
    assert cleaner.keep(doc(ARITHMETIC, kind="math", bucket="math")) is None
    assert Cleaner().keep(doc(ARITHMETIC)) is None  # as prose: no language left to judge
    # LaTeX-heavy English prose: judged on its English once the formulas are stripped
    assert cleaner.keep(doc(LATEX)) is None
    assert "\\frac" not in prose_only(LATEX) and "weighted sum" in prose_only(LATEX)
    # English over a table of numbers: identified as no language ("zxx") unless the table is stripped
    table = ENGLISH[:120] + "\n" + "\n".join(f"{i} | {i * i} | {i ** 3} | {i / 2:.2f}" for i in range(1, 60))
    assert rank_languages(table)[0][0] != "en" and Cleaner().keep(doc(table)) is None
    # doctest and indented code lines are stripped too, and only they
    stripped = prose_only("Return True if the operand is a quiet NaN.\n>>> is_qnan(1)\nFalse\n"
                          "    flag = is_qnan(x)\nOtherwise return False.")
    assert ">>>" not in stripped and "flag" not in stripped and stripped.endswith("Otherwise return False.")
    # a foreign kind-exempt document is not language-filtered; the same text as prose is
    assert cleaner.keep(doc(FRENCH, kind="reasoning", bucket="reasoning")) is None
    assert Cleaner().keep(doc(FRENCH)) == "language"


def test_blocklisted_words_are_dropped_as_toxicity(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# made-up words\n\nZorblat\nquimfex\n")
    assert read_blocklist(path) == {"zorblat", "quimfex"}
    cleaner = Cleaner(blocklist=path)
    assert cleaner.keep(doc(ENGLISH + " What a zorblat, said the Quimfex.")) == "toxicity"
    assert cleaner.keep(doc(ENGLISH)) is None
    # one hit in a long document is under the 0.5% rate; a threshold of 0 drops on any hit
    long = prose(400, seed=3) + " zorblat"
    assert Cleaner(blocklist=path).keep(doc(long, kind="facts")) is None
    assert Cleaner(blocklist=path, toxicity_threshold=0).keep(doc(long, kind="facts")) == "toxicity"


def test_builtin_blocklist_ships_with_the_package():
    builtin = read_blocklist(None)
    assert len(builtin) >= 20 and read_blocklist("") == builtin
    word = sorted(builtin)[0]  # read from the list, so this file stays clean
    assert Cleaner().keep(doc(f"{ENGLISH} {word.upper()}!")) == "toxicity"


def test_missing_blocklist_is_a_one_line_error_naming_the_path_and_key(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError) as err:
        Cleaner(blocklist=missing)
    message = str(err.value)
    assert "\n" not in message and str(missing) in message and "data.blocklist" in message


def test_empty_and_short_documents_are_dropped_as_too_short():
    cleaner = Cleaner()
    assert [cleaner.keep(doc(t)) for t in ("", "   \n\t ", "Too short.")] == ["too_short"] * 3


def test_stats_add_up_per_bucket_and_are_plain_json():
    import json

    docs = [doc(prose(60, seed=i), bucket="prose") for i in range(5)]
    docs += [doc(FRENCH), doc(""), docs[0]]
    docs += [doc(CODE, kind="code", bucket="code"), doc(CODE, kind="code", bucket="code")]
    cleaner = Cleaner()
    kept = list(cleaner.filter(docs))
    stats = json.loads(json.dumps(cleaner.stats))
    assert set(stats) == {"prose", "code"}
    for s in stats.values():
        assert set(s["dropped"]) == set(REASONS)
        assert s["read"] == s["kept"] + sum(s["dropped"].values())
    assert stats["prose"]["read"] == 8 and stats["code"] == {
        "read": 2, "kept": 1, "dropped": dict.fromkeys(REASONS, 0) | {"exact_duplicate": 1}}
    assert len(kept) == sum(s["kept"] for s in stats.values()) == 6


def test_same_seed_same_decisions():
    rng = random.Random(0)
    texts = [prose(rng.randint(5, 120), seed=rng.randint(0, 30)) for _ in range(150)]
    texts = [t if rng.random() < 0.7 else t.replace(t.split()[0], "zeppelin", 1) for t in texts]
    decide = lambda c: [c.keep(doc(t, kind="facts")) for t in texts]  # noqa: E731
    first = decide(Cleaner(seed=7))
    assert first == decide(Cleaner(seed=7))
    assert "near_duplicate" in first


def test_from_config_reads_the_data_section(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("zorblat\n")
    cfg = micro_config(f"data.blocklist={path}", "data.lang_threshold=0.5", "data.minhash_perm=32")
    cleaner = Cleaner.from_config(cfg.data, seed=cfg.train.seed)
    assert cleaner.blocklist == {"zorblat"} and cleaner.lang_threshold == 0.5
    assert cleaner.keep(doc(ENGLISH + " zorblat")) == "toxicity"
    with pytest.raises(DataError, match="data.blocklist"):
        Cleaner.from_config(micro_config(f"data.blocklist={tmp_path / 'missing.txt'}").data, seed=0)
