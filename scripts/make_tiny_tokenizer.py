"""Write the small CLIP BPE vocabulary kept in the repository (unlearn/assets/tiny_clip_tokenizer).

The tiny offline doubles (model=tiny_sd) need a real ``CLIPTokenizer``; CLIP's own vocabulary
(49,408 tokens) is a download. This one has every byte (alone and word-final), the special
tokens, and merges for the lowercase letter pairs and a few words of the paper's prompts, so
any text tokenises (mostly into characters). Run once; the output is committed.
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "unlearn" / "assets" / "tiny_clip_tokenizer"
WORDS = ["a", "photo", "of", "dog", "cat", "horse", "cowboy", "golden", "retriever", "german", "shepherd", "brown",
         "digit", "the", "an", "image", "picture"]


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def main():
    chars = list(bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    have = set(vocab)
    for w in WORDS:  # greedy left-to-right merges building each word as one token
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            new = cur + p
            if new not in have:
                merges.append((cur, p))
                vocab.append(new)
                have.add(new)
            cur = new
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False, indent=0))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (OUT / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>"}))
    (OUT / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True,
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>"}))
    print(f"{len(vocab)} tokens, {len(merges)} merges -> {OUT}")


if __name__ == "__main__":
    main()
