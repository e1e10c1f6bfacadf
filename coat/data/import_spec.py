"""What `coat data import` is asked to do, as one typed spec: the command's options and `import_corpus` share its
defaults and its checks. Kept free of heavy imports because the CLI reads it for its options' defaults."""

from __future__ import annotations

from dataclasses import dataclass

from coat.errors import UsageError

FORMATS = ("librispeech", "meld", "gtzan", "mmau", "mmar", "table")


class ImportUsageError(UsageError, ValueError):
    """The command line does not fit the corpus: unknown format, an option of another format, a bad share."""


@dataclass(frozen=True)
class TableColumns:
    """Where the generic `table` format finds each field. `question` None: every row gets the `prompt` given."""

    audio: str = "audio"
    question: str | None = "question"
    answer: str = "answer"
    choices: str | None = None
    split: str | None = None
    speaker: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class ImportSpec:
    """How to import a corpus. `seed`, `val_share` and `test_share` draw the split where the corpus defines none
    (shares of groups: speakers or clips); audio is decoded (and video tracks extracted) at `sample_rate` Hz and
    clips over `max_seconds` are quarantined; rows whose audio lies outside the corpus folder are quarantined
    unless `allow_outside_root`. `columns`, `task` and `prompt` are for the `table` format only."""

    seed: int = 0
    val_share: float = 0.1
    test_share: float = 0.1
    sample_rate: int = 16000
    max_seconds: float | None = 30.0
    allow_outside_root: bool = False
    columns: TableColumns | None = None
    task: str | None = None
    prompt: str | None = None

    def check(self, fmt: str) -> None:
        """Raises ImportUsageError for an unknown format, table options with another format, or shares that
        leave no rows to train on."""
        if fmt not in FORMATS:
            raise ImportUsageError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        if fmt != "table" and (self.columns is not None or self.task is not None or self.prompt is not None):
            raise ImportUsageError(f"--audio-col and the other column options, --task and --prompt are for the "
                                   f"table format, not {fmt!r}: drop them")
        if not (0 <= self.val_share < 1 and 0 <= self.test_share < 1 and self.val_share + self.test_share < 1):
            raise ImportUsageError(f"--val-share {self.val_share} and --test-share {self.test_share}: each must be "
                                   "in [0, 1) and their sum below 1, so some rows train")
