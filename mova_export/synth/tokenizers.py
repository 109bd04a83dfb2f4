"""Tokenizer files made offline for synthetic checkpoints.

Synthetic checkpoints need the two tokenizers a real MoVA-8B checkpoint ships, without any download:

* `write_llama3_tokenizer(out_dir, vocab_size)`: a Llama-3-style byte-level BPE (Llama-3's pre-tokenizer split
  regex + ByteLevel, no normalizer, `ignore_merges` as Llama-3 and llama.cpp's `llama-bpe`), trained with the
  `tokenizers` library on a small embedded English corpus (the MoVA system and routing prompts included). The
  regular vocabulary has exactly `vocab_size - 256` entries (deterministic synthetic merges pad what training does
  not reach) and Llama-3's 256 special tokens follow in Llama-3's order, so at vocab_size=128256 every special
  token sits at its real id (<|begin_of_text|> 128000, <|eot_id|> 128009). eos is <|eot_id|>, as MoVA-8B uses.
* `write_bert_vocab(out_dir, vocab_size)`: a lowercase WordPiece vocab.txt ([PAD] [UNK] [CLS] [SEP] [MASK] first)
  built from the same corpus (characters, ##continuations, words by frequency), padded with [unusedN] entries to
  vocab_size (bert-large-uncased: 30522).

Same arguments, same bytes, in any process: the BPE trainer is deterministic (checked across processes), the
WordPiece vocab is built without the (run-to-run varying) WordPieceTrainer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ..components import routing_prompt_lines
from ..core.prompts import SYSTEM, chat_prompt, routing_prompt
from ..source.llama3 import (
    BOS_TOKEN,
    EOS_TOKEN,
    LLAMA3_CHAT_TEMPLATE,
    LLAMA3_SPLIT_REGEX,
    LLAMA3_VOCAB_SIZE,
    NUM_SPECIAL,
    llama3_special_tokens,
)

BERT_VOCAB_SIZE = 30522
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_CORPUS_EXTRA = """\
The quick brown fox jumps over the lazy dog. What is in the image? Describe this image in detail.
What is the person in the image wearing? What is in the cup? What animal is this? How many people are there?
What color is the car? Where is the cat sitting? Is there a dog in the picture? What does the sign say?
Read the text in the image. What is the title of the chart? Which year has the highest value in the plot?
What is shown in this medical scan? Segment the objects in the photo. Count the objects on the table.
The image shows a man standing next to a red car on a street in the city. A woman is holding an umbrella.
There are two cats sleeping on a sofa. The chart shows the sales of the company from 2010 to 2020.
The document contains a table with numbers and a paragraph of text. The answer is yes. The answer is no.
A, B, C, D, E, F, G. A, D. B, E. none. The model selected experts A and C for this question.
the of and to in is it you that he was for on are with as his they be at one have this from or had by
word but what some we can out other were all there when up use your how said an each she which do their
time if will way about many then them write would like so these her long make thing see him two has look
more day could go come did number sound no most people my over know water than call first who may down
side been now find any new work part take get place made live where after back little only round man year
came show every good me give our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set three want air well also play
small end put home read hand port large spell add even land here must big high such follow act why ask men
change went light kind off need house picture try us again animal point mother world near build self earth
father head stand own page should country found answer school grow study still learn plant cover food sun
four between state keep eye never last let thought city tree cross farm hard start might story saw far sea
draw left late run don't while press close night real life few north open seem together next white children
begin got walk example ease paper group always music those both mark often letter until mile river car feet
care second book carry took science eat room friend began idea fish mountain stop once base hear horse cut
sure watch color face wood main enough plain girl usual young ready above ever red list though feel talk bird
soon body dog family direct pose leave song measure door product black short numeral class wind question
happen complete ship area half rock order fire south problem piece told knew pass since top whole king space
heard best hour better true during hundred five remember step early hold west ground interest reach fast verb
sing listen six table travel less morning ten simple several vowel toward war lay against pattern slow center
love person money serve appear road map rain rule govern pull cold notice voice unit power town fine certain
fly fall lead cry dark machine note wait plan figure star box noun field rest correct able pound done beauty
drive stood contain front teach week final gave green oh quick develop ocean warm free minute strong special
mind behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane stead dry wonder
laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant fill east
paint language among grand ball yet wave drop heart am present heavy dance engine position arm wide sail
material size vary settle speak weight general ice matter circle pair include divide syllable felt perhaps
pick sudden count square reason length represent art subject region energy hunt probable bed brother egg
ride cell believe fraction forest sit race window store summer train sleep prove lone leg exercise wall catch
mount wish sky board joy winter sat written wild instrument kept glass grass cow job edge sign visit past soft
fun bright gas weather month million bear finish happy hope flower clothe strange gone jump baby eight village
meet root buy raise solve metal whether push seven paragraph third shall held hair describe cook floor either
result burn hill safe cat century consider type law bit coast copy phrase silent tall sand soil roll
0 1 2 3 4 5 6 7 8 9 10 12 16 24 32 48 64 100 128 144 256 576 1024 2024 3.14 50% $20 #1 @user (a) [b] {c}
"Hello," she said. 'Yes!' -- OK? I'm sure it's fine; we'll see. They've gone, you'd know, he's here.
"""


def corpus() -> list[str]:
    """The embedded English training corpus: MoVA's prompts plus common words and sample questions."""

    prompt = routing_prompt(routing_prompt_lines())
    return [SYSTEM, prompt, prompt + "What is in the image?", *_CORPUS_EXTRA.splitlines()]


# ---- Llama-3 BPE ---------------------------------------------------------------------------------------------------
def _llama3_pipeline(tokenizer: Any) -> None:
    from tokenizers import Regex, decoders, pre_tokenizers

    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()


def _train_bpe(regular_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE trained on the corpus, at most `regular_size` entries (256 byte symbols + merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    _llama3_pipeline(tok)
    trainer = trainers.BpeTrainer(vocab_size=regular_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges  # type: ignore[arg-type]


def _pad_merges(vocab: dict[str, int], merges: list[tuple[str, str]], regular_size: int) -> None:
    """Append deterministic synthetic merges (existing token + byte symbol) until the vocab has regular_size entries.

    They rank after every trained merge, so they only decide how rare byte sequences are split; HF tokenizers and
    llama.cpp apply them identically. The real Llama-3 vocabulary has 128000 regular entries.
    """
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    by_id = sorted(vocab, key=vocab.__getitem__)
    i = 0
    while len(vocab) < regular_size:
        left = by_id[i]
        for right in alphabet:
            token = left + right
            if token not in vocab:
                vocab[token] = len(vocab)
                by_id.append(token)
                merges.append((left, right))
                if len(vocab) == regular_size:
                    break
        i += 1


def build_llama3_tokenizer(vocab_size: int = LLAMA3_VOCAB_SIZE) -> Any:
    """The `tokenizers.Tokenizer` written by write_llama3_tokenizer (regular vocab + 256 Llama-3 special tokens)."""
    from tokenizers import AddedToken, Tokenizer, models, processors

    regular_size = vocab_size - NUM_SPECIAL
    if regular_size < 512:
        raise ValueError(f"vocab_size={vocab_size} is too small for a Llama-3-style tokenizer: it needs 256 byte "
                         f"symbols, some merges and {NUM_SPECIAL} special tokens; use at least {512 + NUM_SPECIAL}")
    vocab, merges = _train_bpe(regular_size)
    _pad_merges(vocab, merges, regular_size)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    _llama3_pipeline(tok)
    specials = llama3_special_tokens()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos_id = tok.token_to_id(BOS_TOKEN)
    if bos_id != regular_size or tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(f"special tokens landed at {bos_id}, expected {regular_size}")  # a bug, not user input
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS_TOKEN}:0 $A:0", pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
                                      special_tokens=[(BOS_TOKEN, bos_id)]),
    ])
    return tok


def write_llama3_tokenizer(out_dir: str | Path, vocab_size: int = LLAMA3_VOCAB_SIZE) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json of a Llama-3-style tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_llama3_tokenizer(vocab_size)
    tok.save(str(out / "tokenizer.json"), pretty=False)
    first = vocab_size - NUM_SPECIAL
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 8192,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": LLAMA3_CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(first + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True}
            for i, t in enumerate(llama3_special_tokens())},
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN})
    return out


# ---- BERT WordPiece -------------------------------------------------------------------------------------------------
def build_bert_vocab(vocab_size: int = BERT_VOCAB_SIZE) -> list[str]:
    """vocab.txt lines: the 5 specials, the corpus' characters (alone and as ##continuations), common suffixes, the
    corpus' lowercase words by frequency, then [unusedN] padding. Built directly rather than with the tokenizers
    WordPieceTrainer, whose result changes from run to run; every corpus word is one piece, any other word over
    the alphabet splits into characters."""
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    norm = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True, strip_accents=None)
    split = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for line in corpus():
        words.update(w for w, _ in split.pre_tokenize_str(norm.normalize_str(line)))
    chars = sorted({c for w in words for c in w})
    pieces: list[str] = []
    seen: set[str] = set()
    for piece in (*BERT_SPECIALS, *chars, *(f"##{c}" for c in chars), *_BERT_SUFFIXES,
                  *(w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])))):
        if piece not in seen:
            pieces.append(piece)
            seen.add(piece)
    minimum = len(BERT_SPECIALS) + 2 * len(chars)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the corpus alphabet needs ({minimum} pieces: "
                         "specials, characters and their ## forms); use at least that many")
    pieces = pieces[:vocab_size]
    return pieces + [f"[unused{i}]" for i in range(vocab_size - len(pieces))]


_BERT_SUFFIXES = tuple(f"##{s}" for s in ("s", "es", "ed", "ing", "er", "ers", "ly", "ion", "ions", "al", "ment",
                                          "ness", "est", "ive", "able", "ity", "ful", "less", "ize", "ic"))


def write_bert_vocab(out_dir: str | Path, vocab_size: int = BERT_VOCAB_SIZE) -> Path:
    """Write vocab.txt and a minimal tokenizer_config.json (bert-large-uncased style) to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = build_bert_vocab(vocab_size)
    (out / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512,
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]", "tokenize_chinese_chars": True, "strip_accents": None,
    })
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def iter_sample_texts() -> Iterable[str]:
    """Strings the tokenizer parity tests use: prompts, chat frames, specials, odd whitespace, unicode."""

    prompt = routing_prompt(routing_prompt_lines())
    yield from (prompt, SYSTEM, chat_prompt("What is in the image?", routing_prompt=prompt),
                chat_prompt("Describe this image."), "A, D", "none", "B",
                "Hello world!  Multiple   spaces\n\nand\ttabs", "naïve café 東京 🦙 emojis",
                "I've been 'told he's there, 'RE you sure? 3333333 3.14", "<|eot_id|><|start_header_id|>")
