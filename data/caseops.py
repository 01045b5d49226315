"""Lossless case operations: text -> a lowercase lexical stream with reserved case markers, and back.

    encode("The NASA iPhone")  ==  "\ue000the\ue001 nasa i\ue002phone"
    decode(encode(text)) == text        for every str (tests/test_caseops.py)

A tokenizer trained on encode(text) spends no pieces on case variants ("The", "the", "THE" are one word plus a
marker). Markers (Unicode private-use code points; sentencepiece keeps each one as its own piece, a
user-defined symbol):
  TITLE    the next word is TitleCase: its first letter upper, the rest lower
  ALLCAPS  the next word is all upper case (two letters or more)
  CAP      the next letter is upper case (words of any other mix of cases: "iPhone", "McDonald")
  ESC      the next character is a literal marker character that was in the text
A word is a maximal run of letters of the case table below. A marker that starts a word goes before the one space
in front of it, if there is one, so that the word keeps its space-prefixed piece ("▁the", not "▁" + "the").

Case table (which letters are lowered): pairs (U, l) with U.lower() == l, l.upper() == U, both a single code point,
U.upper() == U and l.lower() == l, both assigned in Unicode 3.2 (Python keeps that database as
unicodedata.ucd_3_2_0; Unicode's case-pair stability then makes the table the same in every Python version, which
CASE_TABLE_SHA256 pins). Every other character passes through unchanged and separates words, in particular those
whose case mapping does not round-trip: 'ß' (upper "SS"), 'ẞ', Turkish 'İ' (lower "i̇") and 'ı', Greek final 'ς'
(upper 'Σ', whose lower is 'σ'), the titlecase digraphs 'ǅ' 'ǈ' 'ǋ' 'ǲ', the Kelvin and Ohm signs, and the letters
added after Unicode 3.2. Every pair of the table has the same UTF-8 length in both cases, so a lowered letter
stands for exactly its own bytes of the original.

Normalisation. The caseops pipeline (data/build_shards.py --caseops) first normalises each document as the
challenge's tokenizers do (sentencepiece nmt_nfkc, extra whitespace removed: normalizer()), then applies encode(),
and tokenizes with sentencepiece's identity normalisation. Normalising after encode() would not commute with the
case change: NFKC composes "j" + U+030C into 'ǰ' but leaves "J" + U+030C alone (there is no precomposed capital),
so the marker would lose its letter. Hence decode(the tokens' text) == the normalised document, whose UTF-8 length
is what the challenge's byte rule counts for a plain tokenizer (SPEC.md §3), and token_bytes() charges exactly that.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

CASEOPS_VERSION = 1
TITLE, ALLCAPS, CAP, ESC = "\ue000", "\ue001", "\ue002", "\ue003"
MARKERS = (TITLE, ALLCAPS, CAP, ESC)
CASE_TABLE_SHA256 = "2f84d12ba6630b05c29da5c31726f1e56b589f6a859395386de4eb2e138a4a21"  # 713 pairs


def case_pairs() -> list[tuple[str, str]]:
    """(upper, lower) pairs of the case table, in code point order."""
    old = unicodedata.ucd_3_2_0
    pairs = []
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        upper = chr(cp)
        lower = upper.lower()
        if len(lower) != 1 or lower == upper or lower.upper() != upper or upper.upper() != upper:
            continue
        if lower.lower() != lower or old.category(upper) == "Cn" or old.category(lower) == "Cn":
            continue
        pairs.append((upper, lower))
    return pairs


def table_sha256(pairs: list[tuple[str, str]]) -> str:
    return hashlib.sha256("".join(u + l for u, l in pairs).encode("utf-8")).hexdigest()


PAIRS = case_pairs()
UPPER = frozenset(u for u, _ in PAIRS)
LOWER = frozenset(l for _, l in PAIRS)
TO_UPPER = {ord(l): u for u, l in PAIRS}
TO_LOWER = {ord(u): l for u, l in PAIRS}  # not str.lower: that one lowers a word-final 'Σ' to 'ς' (Final_Sigma)


def _char_class(chars) -> str:
    """The inside of a regex class matching chars, as ranges of consecutive code points (sre scans ranges ~6x faster
    than the same characters listed one by one)."""
    points, parts = sorted(map(ord, chars)), []
    for cp in points:
        if parts and parts[-1][1] == cp - 1:
            parts[-1][1] = cp
        else:
            parts.append([cp, cp])
    return "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "") for a, b in parts)


LETTERS = UPPER | LOWER
_LOWER = f"[{_char_class(LOWER)}]"
_MARKER = f"[{_char_class(MARKERS)}]"
# encode visits only upper-case letters and literal markers (sparse), then reads the whole word around the letter
_ENCODE_RE = re.compile(f"[{_char_class(UPPER | set(MARKERS))}]")  # one class: sre scans for it quickly
_WORD_END_RE = re.compile(f"[{_char_class(LETTERS)}]*")
# decode: a marker, and what it applies to (chosen by the lookbehind on the marker); nothing for a malformed one. Its
# first element a single class, so sre scans for it quickly.
_DECODE_RE = re.compile(f"({_MARKER})(?:(?<={ESC})({_MARKER})|(?<=[{TITLE}{CAP}])( ?)({_LOWER})"
                        f"|(?<={ALLCAPS})( ?)({_LOWER}+))?")


def encode_word(word: str, space: str) -> str:
    """One word with an upper-case letter, and the space before it ("" or " "), as markers + lowercase."""
    lower = word.translate(TO_LOWER)
    if word[0] in UPPER and word[1:] == lower[1:]:
        return TITLE + space + lower
    if len(word) > 1 and word.translate(TO_UPPER) == word:
        return ALLCAPS + space + lower
    first = (CAP if word[0] in UPPER else "") + space + lower[0]
    return first + "".join(CAP + low if ch in UPPER else low for ch, low in zip(word[1:], lower[1:]))


def encode(text: str) -> str:
    """The lowercase stream with case markers; literal marker characters are escaped (decode(encode(t)) == t)."""
    out, done = [], 0  # text[:done] is encoded
    for m in _ENCODE_RE.finditer(text):
        at = m.start()
        if at < done:  # another upper-case letter of a word already encoded
            continue
        if text[at] in MARKERS:
            out += [text[done:at], ESC, text[at]]
            done = at + 1
            continue
        start = at
        while start > done and text[start - 1] in LETTERS:
            start -= 1
        space = " " if start > done and text[start - 1] == " " else ""
        end = _WORD_END_RE.match(text, at).end()
        out += [text[done:start - len(space)], encode_word(text[start:end], space)]
        done = end
    out.append(text[done:])
    return "".join(out)


def _decode_match(m: re.Match) -> str:
    if m.group(2):
        return m.group(2)
    if m.group(4):
        return m.group(3) + TO_UPPER[ord(m.group(4))]
    if m.group(6):
        return m.group(5) + m.group(6).translate(TO_UPPER)
    raise ValueError(f"malformed caseops text: marker U+{ord(m.group(1)):04X} at {m.start()} is not followed by "
                     f"what it applies to")


def decode(text: str) -> str:
    """The original text of encode()'s output; ValueError on text encode() cannot produce."""
    return _DECODE_RE.sub(_decode_match, text)


# -----------------------------------------------------------------------------
# Tokenizer side


def normalizer():
    """The text normalisation of the challenge's tokenizers (nmt_nfkc, extra whitespace removed, no dummy prefix),
    as a standalone sentencepiece normaliser: normalizer().normalize(doc) == sp.decode(sp.encode(doc)) for them."""
    import sentencepiece as spm

    if not hasattr(spm, "SentencePieceNormalizer"):
        raise ImportError(f"caseops needs sentencepiece >= 0.2.0 (SentencePieceNormalizer); this is "
                          f"{spm.__version__}: pip install -U sentencepiece")
    return spm.SentencePieceNormalizer(rule_name="nmt_nfkc", add_dummy_prefix=False, escape_whitespaces=False,
                                       remove_extra_whitespaces=True)


# Trainer settings that differ from a plain tokenizer's: the text arrives normalised and encoded, and must be
# tokenized as it is (see the module docstring), with every marker its own piece.
TOKENIZER_SETTINGS = {"normalization_rule_name": "identity", "remove_extra_whitespaces": False,
                      "user_defined_symbols": list(MARKERS)}


def surface_bytes(sp) -> np.ndarray:
    """Per token id: the UTF-8 bytes it adds to sp.decode's text (byte pieces 1, '▁' a space, control pieces 0)."""
    out = np.zeros(sp.get_piece_size(), dtype=np.int64)
    for t in range(sp.get_piece_size()):
        if sp.is_byte(t):
            out[t] = 1
        elif not (sp.is_control(t) or sp.is_unknown(t)):
            out[t] = len(sp.id_to_piece(t).replace("\u2581", " ").encode("utf-8"))
    return out


def check_tokenizer(sp) -> tuple[np.ndarray, np.ndarray]:
    """(surface_bytes(sp), the ids of MARKERS) of a caseops tokenizer; ValueError for a tokenizer that lacks a marker
    piece or does not keep its input as it is (a normalising one would change the text under the markers)."""
    ids = np.array([sp.piece_to_id(m) for m in MARKERS], dtype=np.int64)
    if any(sp.id_to_piece(int(i)) != m for i, m in zip(ids, MARKERS)):
        raise ValueError("the tokenizer has no piece for each case marker; train it with TOKENIZER_SETTINGS")
    probe = encode("A  J\u030c \ufb01\u00a0" + "".join(MARKERS))
    if sp.decode(sp.encode(probe)) != probe:
        raise ValueError("the tokenizer normalises its input; caseops text must be tokenized as it is "
                         "(normalization_rule_name=identity, remove_extra_whitespaces=False)")
    return surface_bytes(sp), ids


def token_bytes(ids: np.ndarray, surface: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """Original UTF-8 bytes each token of encode(text) stands for: its own bytes, 0 for a marker, and an escaped
    literal marker its 3 bytes. Sums to len(decode(sp.decode(ids)).encode()) because lowered letters keep their
    UTF-8 length and every marker is a piece of its own (build_shards checks the sum per document)."""
    ids = np.asarray(ids, dtype=np.int64)
    counts = surface[ids].copy()
    is_marker = np.isin(ids, markers)
    counts[is_marker] = 0
    esc = int(markers[3])
    if (ids == esc).any():  # rare: walk the markers left to right (ESC ESC is an escaped ESC)
        open_esc = -2
        for j in np.flatnonzero(is_marker):
            if j == open_esc + 1:
                counts[j], open_esc = surface[ids[j]], -2
            else:
                open_esc = j if ids[j] == esc else -2
    return counts
