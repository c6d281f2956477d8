"""The row type every reader produces."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Example:
    """One instruction-following row.

    Attributes:
        instruction: the task description.
        input: the optional context ("" when there is none).
        references: the reference answers, at least one; training uses ``references[0]`` as the response and
            evaluation keeps the best score over all of them.
        prompt: the exact prompt string the model is conditioned on (the protocol template applied to
            ``instruction`` and ``input``, unless the source file carries its own).
        topic: the Dolly category, the S-NI task or the synthetic family, when known.
    """

    instruction: str
    input: str
    references: list[str]
    prompt: str
    topic: str | None = field(default=None)

    @property
    def response(self) -> str:
        """The training target: the first reference."""
        return self.references[0]

    def to_row(self) -> dict:
        """The row in the MiniLLM JSONL schema (``output`` a string for one reference, a list for several)."""
        row = asdict(self)
        refs = row.pop("references")
        row["output"] = refs[0] if len(refs) == 1 else refs
        if row["topic"] is None:
            del row["topic"]
        return row
