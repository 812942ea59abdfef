"""Tokenizers for the token cache: raw UTF-8 bytes, or a byte-level BPE trained on the train split.

Both expose encode / decode / vocab_size / name / token_bytes. `token_bytes` counts the UTF-8
bytes of the source text the ids stand for, so val_bpb = loss_nats / ln(2) / bytes_per_token is
comparable across tokenizers.

Document separator (part of the token stream, see `encode_docs`):
- byte: every document is followed by the text "\\n\\n" (there is no free id in a 256 vocab). It is
  real text, so it counts 2 bytes in token_bytes.
- bpe: every document is followed by the special token <|endoftext|> (id 0). It stands for no
  text, so it counts 0 bytes; `decode` renders it as the literal "<|endoftext|>".
"""

import numpy as np

from scaling_suite.errors import SuiteError

BYTE_VERSION = "byte-v1"
BPE_VERSION = "bpe-v1"  # bump when training/encoding changes so old caches are not reused
EOT = "<|endoftext|>"
MAX_VOCAB = 65535  # token ids are stored as uint16


def check_tokenizer(tokenizer: str, vocab_size: int) -> int:
    """Validate the (tokenizer, vocab_size) pair early and return the effective vocab size."""
    if tokenizer == "byte":
        if vocab_size not in (0, 256):
            raise SuiteError(f"tokenizer=byte has vocab_size 256 (got {vocab_size}); use vocab_size=256 or tokenizer=bpe")
        return 256
    if tokenizer == "bpe":
        if not isinstance(vocab_size, int) or not 257 <= vocab_size <= MAX_VOCAB:
            raise SuiteError(f"tokenizer=bpe needs 257 <= vocab_size <= {MAX_VOCAB} (tokens are stored as uint16); got {vocab_size}")
        return vocab_size
    raise SuiteError(f"unknown tokenizer {tokenizer!r}: expected 'byte' or 'bpe'")


def version(tokenizer: str) -> str:
    if tokenizer == "byte":
        return BYTE_VERSION
    import tokenizers   # lazy: only the bpe tokenizer needs the library (the byte tokenizer is the default)
    # The library version is part of the key: a new tokenizers release may train different merges.
    return f"{BPE_VERSION}/tokenizers-{tokenizers.__version__}"


def _ids(ids) -> np.ndarray:
    if hasattr(ids, "numpy"):  # torch tensor
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids, dtype=np.int64).reshape(-1)


class ByteTokenizer:
    name = "byte"
    vocab_size = 256
    separator = "\n\n"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(_ids(ids).astype(np.uint8)).decode("utf-8", errors="replace")

    def token_bytes(self, ids) -> int:
        return int(_ids(ids).size)

    def encode_docs(self, docs: list[str]) -> np.ndarray:
        text = "".join(d + self.separator for d in docs)
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)


class BPETokenizer:
    name = "bpe"

    def __init__(self, tok, vocab_size: int):
        self.tok = tok
        # Literal "<|endoftext|>" inside a document must stay text, or decode(encode(s)) != s and
        # documents could be split by their content.
        tok.encode_special_tokens = True
        self.vocab_size = vocab_size  # requested size: the model's embedding size, >= learned ids
        self.eot = tok.token_to_id(EOT)
        # byte length of every id: in the ByteLevel alphabet one character is one byte.
        self._nbytes = np.zeros(vocab_size, dtype=np.int64)
        for piece, i in tok.get_vocab().items():
            self._nbytes[i] = 0 if piece == EOT else len(piece)

    @classmethod
    def train(cls, texts, vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers   # lazy: see version()
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        return cls(tok, vocab_size)

    @classmethod
    def load(cls, path, vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer   # lazy: see version()
        return cls(Tokenizer.from_file(str(path)), vocab_size)

    def save(self, path) -> None:
        self.tok.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(_ids(ids).tolist(), skip_special_tokens=False)

    def token_bytes(self, ids) -> int:
        return int(self._nbytes[_ids(ids)].sum())

    def encode_docs(self, docs: list[str]) -> np.ndarray:
        out = []
        for enc in self.tok.encode_batch(docs, add_special_tokens=False):  # parallel in Rust
            out.extend(enc.ids)
            out.append(self.eot)
        return np.array(out, dtype=np.uint16)


Tokenizer = ByteTokenizer | BPETokenizer
