"""Text encoders: captions -> token embeddings ``(B, L, D)`` for the backbone's text stream."""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from consisid_lab.models.vae import torch_dtype

logger = logging.getLogger(__name__)

PAD_ID = 0  # bag-of-words padding id; word ids are 1..vocab_size-1
_WORD = re.compile(r"[a-z]+")


class TextEncoder(nn.Module):
    """Interface: ``forward(captions) -> (B, max_length, dim)``, always padded to ``max_length``.

    ``frozen`` declares whether the encoder may train (the trainable selectors never unfreeze a frozen one).
    """

    frozen: bool = False
    dim: int
    max_length: int

    def forward(self, captions: list[str]) -> Tensor:
        raise NotImplementedError


def word_id(word: str, vocab_size: int) -> int:
    """Stable id of a word in ``1..vocab_size-1``: CRC32, identical across processes (unlike salted ``hash``)."""
    return 1 + zlib.crc32(word.encode("utf-8")) % (vocab_size - 1)


class BagOfWordsTextEncoder(TextEncoder):
    """Trainable, weight-free-to-load text encoder for the embedded benchmark.

    Words (lower-case runs of letters) are hashed to ids, embedded, given learned positions and mixed by one
    pre-norm transformer layer, so word order and context can matter. Padding positions come out as zeros.

    Args:
        dim: output width D.
        max_length: L; longer captions are truncated (logged at debug level).
        vocab_size: hash buckets (id 0 is padding); collisions merge words, harmless at benchmark vocab sizes.
        num_heads: heads of the mixing layer (must divide ``dim``).
        stop_words: words dropped before embedding (function words): more of a caption fits in ``max_length``.
        pretrained: a base backbone's root (``text_encoder/`` inside it, as ``export layout=backbone`` writes it)
            or that folder: the weights start from it, strictly, after its config is checked against these sizes.
    """

    WEIGHTS = "text_encoder.safetensors"
    CONFIG = "config.json"

    def __init__(
        self,
        dim: int = 64,
        max_length: int = 32,
        vocab_size: int = 4096,
        num_heads: int = 4,
        stop_words: Sequence[str] = (),
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (id 0 is padding), got {vocab_size}")
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.dim = dim
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.stop_words = frozenset(w.lower() for w in stop_words)
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
        self.pos = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        self.mix = nn.TransformerEncoderLayer(
            dim, num_heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(dim)
        self.num_heads = num_heads
        if pretrained:
            self.load_pretrained(pretrained)

    def settings(self) -> dict:
        """What shapes the weights and the tokens: a saved encoder must match all of it to be loaded."""
        return {
            "dim": self.dim,
            "max_length": self.max_length,
            "vocab_size": self.vocab_size,
            "num_heads": self.num_heads,
            "stop_words": sorted(self.stop_words),
        }

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` and the weights (safetensors) into ``folder``."""
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / self.CONFIG).write_text(json.dumps(self.settings(), indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(out / self.WEIGHTS))
        return out

    def load_pretrained(self, path: str | Path) -> Path:
        """Load weights written by :meth:`save_pretrained` from ``path`` or ``path/text_encoder``, strictly."""
        from safetensors.torch import load_file

        root = Path(path).expanduser()
        folder = root / "text_encoder" if (root / "text_encoder" / self.CONFIG).is_file() else root
        if not (folder / self.CONFIG).is_file() or not (folder / self.WEIGHTS).is_file():
            raise FileNotFoundError(
                f"model.text_encoder.pretrained={path}: no {self.CONFIG} and {self.WEIGHTS} in {folder} (nor in its "
                "text_encoder/); pass a folder written by `python -m consisid_lab.export layout=backbone`"
            )
        saved = json.loads((folder / self.CONFIG).read_text())
        ours = self.settings()
        wrong = {k: (saved.get(k), v) for k, v in ours.items() if saved.get(k) != v}
        if wrong:
            raise ValueError(
                f"model.text_encoder.pretrained={path} was saved with other settings: "
                + "; ".join(f"{k}: saved {a!r}, here {b!r}" for k, (a, b) in wrong.items())
                + "; set model.text_encoder to the saved values"
            )
        self.load_state_dict(load_file(str(folder / self.WEIGHTS)), strict=True)
        logger.info("text encoder weights from %s", folder)
        return folder

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """``(ids (B, L) long, valid (B, L) bool)``; deterministic across processes and machines."""
        ids = torch.full((len(captions), self.max_length), PAD_ID, dtype=torch.long)
        for i, caption in enumerate(captions):
            words = [w for w in _WORD.findall(caption.lower()) if w not in self.stop_words]
            if len(words) > self.max_length:
                logger.debug("caption %d: %d words, dropped %d", i, len(words), len(words) - self.max_length)
            row = [word_id(w, self.vocab_size) for w in words[: self.max_length]]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != PAD_ID

    def forward(self, captions: list[str]) -> Tensor:
        ids, valid = self.tokenize(captions)
        ids, valid = ids.to(self.pos.device), valid.to(self.pos.device)
        x = self.embed(ids) + self.pos  # (B, L, D)
        # An empty caption (the unconditional input of CFG) has no valid key; let it attend to position 0 so the
        # attention softmax is defined; its output is zeroed below anyway.
        key_pad = ~valid
        key_pad[:, 0] = False
        x = self.mix(x, src_key_padding_mask=key_pad)
        return self.norm(x) * valid[..., None]  # (B, L, D)


class T5TextEncoder(TextEncoder):
    """transformers' T5 encoder + tokenizer from a local folder, frozen (CogVideoX / ConsisID: L=226, D=4096).

    Like the released pipelines, captions are padded to ``max_length`` and the encoder runs without an attention
    mask (CogVideoX was trained that way); captions longer than ``max_length`` are truncated with a warning.

    Args:
        path: local checkpoint root (or any folder holding the two subfolders below).
        max_length: L.
        dtype: weights dtype (``"float32"``, ``"bfloat16"``, ``"float16"``).
        tokenizer_subfolder / encoder_subfolder: where tokenizer and encoder live inside ``path``.
    """

    frozen = True  # 4.7 B parameters at the released size: never trained (nor shadowed by the EMA)

    def __init__(
        self,
        path: str,
        max_length: int = 226,
        dtype: str = "float32",
        tokenizer_subfolder: str = "tokenizer",
        encoder_subfolder: str = "text_encoder",
    ) -> None:
        super().__init__()
        from transformers import T5EncoderModel, T5Tokenizer

        root = Path(path).expanduser()
        for sub in (tokenizer_subfolder, encoder_subfolder):
            if not (root / sub).is_dir():
                raise FileNotFoundError(
                    f"no T5 {sub!r} folder at {root / sub}; set model.text_encoder.path to a local "
                    "CogVideoX/ConsisID checkpoint folder (weights are never downloaded) or use model/text_encoder=bow"
                )
        self.tokenizer = T5Tokenizer.from_pretrained(str(root / tokenizer_subfolder), local_files_only=True)
        encoder = T5EncoderModel.from_pretrained(
            str(root / encoder_subfolder), dtype=torch_dtype(dtype), local_files_only=True
        )
        encoder.requires_grad_(False)
        encoder.eval()
        self.encoder = encoder
        self.max_length = max_length
        self.dim = int(encoder.config.d_model)

    def train(self, mode: bool = True) -> T5TextEncoder:
        # Frozen: stays in eval mode (no dropout) whatever the surrounding module does.
        super().train(mode)
        self.encoder.eval()
        return self

    def tokenize(self, captions: list[str]) -> Tensor:
        """Token ids ``(B, max_length)``; warns with the number of tokens cut from each over-long caption."""
        full = self.tokenizer(list(captions), add_special_tokens=True, truncation=False)["input_ids"]
        for i, ids in enumerate(full):
            if len(ids) > self.max_length:
                logger.warning(
                    "caption %d has %d tokens, max_length is %d: dropped %d tokens",
                    i,
                    len(ids),
                    self.max_length,
                    len(ids) - self.max_length,
                )
        out = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return out["input_ids"]

    @torch.no_grad()
    def forward(self, captions: list[str]) -> Tensor:
        ids = self.tokenize(captions).to(self.encoder.device)
        return self.encoder(ids)[0]  # (B, L, D)
