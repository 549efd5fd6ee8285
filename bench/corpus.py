"""Deterministic synthetic English corpus for benchmarks (no downloads).

Texts are built from word lists and sentence templates with a seeded RNG, so
the same seed always yields the same texts. The length distribution imitates
what Weaviate sends to ``/vectors``: mostly short object texts (8-40 tokens),
a tail of paragraphs up to ~200 tokens and, on request, a few documents
beyond the 256-token limit of all-MiniLM-L6-v2.

Modes:

* ``iter_corpus(seed)`` / ``get_corpus(n, seed)``: unique texts, never
  repeated within one seed (cache-off runs). Different seeds give different
  texts (collisions are possible only in principle; see ``--stats``).
* ``get_repeating(n, distinct, seed)``: ``n`` texts drawn from a pool of
  ``distinct`` texts, every pool text appearing once before any repeats
  (cache-hit runs).

Run ``python bench/corpus.py --stats`` to print the token-length
distribution measured with the model's own tokenizer.
"""
from __future__ import annotations

import argparse
import itertools
import math
import random
import re
from typing import Iterator

__all__ = ["iter_corpus", "get_corpus", "get_repeating"]

NOUNS = """
archive bakery balcony battery bicycle bridge budget cabinet camera canal
candle castle cathedral ceiling census charter chemist circuit climate
clinic coastline collector committee compass concert contract corridor
cottage council courier crater customer dataset debate delegate desert
diagram diplomat district doctor drought editor election engine engineer
estate exhibit factory farmer ferry festival fisherman forest fountain
gallery garden generator glacier harbour helmet highway historian hospital
hotel inspector island journal journalist judge kitchen laboratory ladder
lantern lawyer library lighthouse magazine manager manuscript market
mayor meadow mechanic merchant meteor microscope migration mineral monastery
museum musician navigator neighbour network novel observatory orchard
orchestra painter pamphlet parliament passenger pharmacy philosopher
photograph pilot pipeline planet poet portrait professor protocol quarry
railway reactor recipe referee reservoir restaurant river satellite
scholar sculptor senator server shipyard signal soldier spreadsheet stadium
startup station statue student submarine surgeon surveyor swamp teacher
telescope tenant terminal theatre tower tractor traveller treaty tribunal
tunnel university valley vendor village vineyard volcano warehouse
waterfall weaver whistle windmill workshop
""".split()

ADJECTIVES = """
abandoned academic ancient annual anxious arctic bright brittle busy
careful central cheerful coastal colourful complex cosmic crowded curious
damp delicate dense distant dusty eager early eastern elegant empty
enormous fragile frozen generous gentle golden graceful hidden historic
humble icy immense industrial informal insecure local lonely loud lucky
magnetic massive medieval modern modest narrow neglected noisy northern
obscure official old ordinary patient peaceful portable precise private
public quiet rapid rare remote restless rural rusty secret silent simple
sleepy slow small solar southern sparse steady stormy strange sturdy
subtle sunny temporary tiny tired tropical urban vacant vast vibrant
vintage warm weathered western wild wooden young
""".split()

VERBS = """
abandoned accepted acquired adjusted admired analysed announced approved
archived assembled audited borrowed built calculated captured celebrated
challenged changed checked cleaned collected completed confirmed
constructed copied criticised decorated defended delivered described
designed destroyed discovered displayed documented donated drew
examined expanded explained explored financed found funded guarded
hired identified illustrated improved inherited inspected installed
investigated launched measured mentioned monitored moved negotiated
observed opened ordered organised painted photographed planned polished
predicted prepared published purchased recorded rebuilt renovated
repaired replaced reported rescued restored reviewed sketched sold
studied surveyed tested translated upgraded visited welcomed wrote
""".split()

ADVERBS = """
briefly carefully cautiously eventually finally formally frequently
gradually happily immediately initially lately loudly nearly often
openly partly patiently politely quickly quietly rarely recently
regularly reluctantly secretly silently slowly suddenly
""".split()

PLACES = """
Aberdeen Bergen Bordeaux Cairo Calgary Cardiff Dublin Edinburgh Florence
Geneva Ghent Hamburg Helsinki Kyoto Lagos Leipzig Lima Lisbon Lyon
Marseille Montreal Nairobi Oslo Porto Prague Quebec Reykjavik Riga Seville
Tallinn Toronto Trieste Turin Valencia Vienna Vilnius Warsaw Zagreb
Zürich Malmö Kraków Córdoba
""".split()

NAMES = """
Ada Amara Anika Bruno Carmen Chen Dalia Dmitri Elena Emeka Farah Felix
Greta Hamid Hana Ingrid Ivan Jonas Kaito Lara Leila Lucas Marta Mateo
Nadia Nils Olga Omar Priya Rafael Rosa Sami Sofia Tariq Theo Uma Viktor
Wen Yara Zoë José Björn Chloé
""".split()

TOPICS = """
agriculture architecture astronomy biology chemistry climate economics
education energy engineering finance geology history linguistics
literature logistics mathematics medicine music navigation oceanography
philosophy physics politics psychology sociology statistics transport
""".split()

CONNECTORS = [
    "However,", "Meanwhile,", "Later that year,", "In the meantime,",
    "As a result,", "Surprisingly,", "According to the report,",
    "At the same time,", "Nevertheless,", "In addition,", "Afterwards,",
]

CLASS_NAMES = ["Article", "Product", "Review", "Question", "Document", "Paragraph", "News Item"]

# Rare markup and symbols so the HTML escaping of Go's encoding/json
# (<, >, & -> \u003c ...) is exercised on the wire.
SYMBOL_FRAGMENTS = ["R&D", "Q&A", "<b>draft</b>", "x < y", "a > b", "AT&T", "p < 0.05"]


def _sentence(rng: random.Random) -> str:
    """Return one sentence built from a random template."""
    n1, n2, n3 = rng.choice(NOUNS), rng.choice(NOUNS), rng.choice(NOUNS)
    a1, a2 = rng.choice(ADJECTIVES), rng.choice(ADJECTIVES)
    v1, v2 = rng.choice(VERBS), rng.choice(VERBS)
    adv, place, name = rng.choice(ADVERBS), rng.choice(PLACES), rng.choice(NAMES)
    topic, year = rng.choice(TOPICS), rng.randint(1850, 2030)
    number = rng.choice([str(rng.randint(2, 99)), str(rng.randint(100, 9999)), f"{rng.uniform(0, 100):.1f}"])
    templates = (
        f"The {a1} {n1} {v1} the {a2} {n2}.",
        f"{name} {adv} {v1} a {a1} {n1} near the {n2} in {place}.",
        f"In {year}, the {n1} of {place} {v1} {number} {n2}s for the {a1} {n3}.",
        f"Why did the {a1} {n1} in {place} never {rng.choice(['visit', 'repair', 'inspect', 'sell'])} the {n2}?",
        f"A {a1} {n1} was {v1} by {name} after the {a2} {n2} {v2} it.",
        f"{rng.choice(CONNECTORS)} the {n1} {v1} {number} reports about {topic} and the {a1} {n2}.",
        f"The study of {topic} {adv} {v1} how a {a1} {n1} affects the {n2}.",
        f"{name}, a {a1} {n1} from {place}, {v1} the {n2} and then {v2} the {a2} {n3}.",
        f"Nobody expected the {n1} to be so {a1}; even the {n2} {adv} {v1} it.",
        f"Visitors to {place} often ask whether the {a1} {n1} is older than the {n2}.",
    )
    sentence = re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", rng.choice(templates))
    if rng.random() < 0.02:
        sentence = sentence[:-1] + f" ({rng.choice(SYMBOL_FRAGMENTS)})" + sentence[-1]
    return sentence


def _fragment(rng: random.Random) -> str:
    """Return a short title-like text, like a Weaviate object with few properties."""
    parts = [rng.choice(ADJECTIVES).capitalize(), rng.choice(NOUNS)]
    style = rng.random()
    if style < 0.4:
        parts += ["of", rng.choice(PLACES)]
    elif style < 0.7:
        parts += [rng.choice(TOPICS), str(rng.randint(1850, 2030))]
    else:
        parts += ["by", rng.choice(NAMES), rng.choice(NAMES)[0] + "."]
    return " ".join(parts)


def _target_tokens(rng: random.Random, long_frac: float) -> int:
    """Sample a target length in tokens: short body, long tail, optional overlong."""
    u = rng.random()
    if u < long_frac:
        return rng.randint(260, 600)
    if u < long_frac + 0.12:
        return int(math.exp(rng.uniform(math.log(40), math.log(200))))
    return max(7, min(48, int(rng.lognormvariate(math.log(18), 0.45))))


def _estimate_tokens(text: str) -> int:
    """Cheap token estimate (wordpiece gives ~1.2 tokens per word plus punctuation)."""
    return int(len(text.split()) * 1.2) + 2


def _text(rng: random.Random, long_frac: float) -> str:
    """Build one text whose length approximates a sampled token target."""
    target = _target_tokens(rng, long_frac)
    prefix = rng.choice(CLASS_NAMES) + " " if rng.random() < 0.3 else ""
    if target <= 10:
        return prefix + _fragment(rng)
    parts = [_fragment(rng)] if rng.random() < 0.3 else []
    size = _estimate_tokens(" ".join(parts))
    while size < target:
        sentence = _sentence(rng)
        grow = _estimate_tokens(sentence) - 2
        # Stop rather than overshoot by more than half a sentence.
        if parts and size + grow - target > grow // 2:
            break
        parts.append(sentence)
        size += grow
    return prefix + " ".join(parts)


def iter_corpus(seed: int = 0, *, long_frac: float = 0.0) -> Iterator[str]:
    """Yield an endless stream of unique texts, deterministic for ``seed``."""
    rng = random.Random(f"vecshim-bench-corpus/{seed}")
    seen: set[str] = set()
    while True:
        text = _text(rng, long_frac)
        if text not in seen:
            seen.add(text)
            yield text


def get_corpus(n: int = 4000, seed: int = 0, *, long_frac: float = 0.0) -> list[str]:
    """Return ``n`` unique texts (``long_frac``: share beyond 256 tokens)."""
    return list(itertools.islice(iter_corpus(seed, long_frac=long_frac), n))


def get_repeating(n: int, distinct: int = 200, seed: int = 0) -> list[str]:
    """Return ``n`` texts cycling through shuffled passes over ``distinct`` unique texts."""
    pool = get_corpus(distinct, seed)
    rng = random.Random(f"vecshim-bench-repeat/{seed}")
    out: list[str] = []
    while len(out) < n:
        order = pool[:]
        rng.shuffle(order)
        out.extend(order)
    return out[:n]


def _print_stats(n: int, seed: int, long_frac: float) -> None:
    """Print the token-length distribution using the bundled model's tokenizer."""
    from benchlib import load_tokenizer, percentile

    texts = get_corpus(n, seed, long_frac=long_frac)
    tok = load_tokenizer()
    lengths = sorted(len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"])
    print(f"{n} texts, seed {seed}: tokens incl. [CLS]/[SEP]")
    for q in (0, 5, 25, 50, 75, 90, 95, 99, 100):
        print(f"  p{q:<3} {percentile(lengths, q):.0f}")
    bands = [(0, 8), (8, 41), (41, 101), (101, 201), (201, 257), (257, 10**9)]
    for lo, hi in bands:
        share = sum(lo <= x < hi for x in lengths) / n
        print(f"  [{lo}, {hi}) {share:6.1%}")
    other = set(get_corpus(n, seed + 1, long_frac=long_frac))
    print(f"  overlap with seed {seed + 1}: {len(other.intersection(texts))} texts")


def main() -> None:
    """CLI: print samples or length statistics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long-frac", type=float, default=0.0, help="share of texts beyond 256 tokens")
    parser.add_argument("--stats", action="store_true", help="print token-length distribution")
    args = parser.parse_args()
    if args.stats:
        _print_stats(args.n, args.seed, args.long_frac)
    else:
        for text in get_corpus(args.n, args.seed, long_frac=args.long_frac):
            print(text)


if __name__ == "__main__":
    main()
