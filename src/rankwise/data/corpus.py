"""The built-in text corpus: the English documentation topics shipped with Python (pydoc_data)."""

from pydoc_data.topics import topics

from rankwise.data.splits import check_split, split_of


def python_docs(split: str = "train") -> list[str]:
    """Distinct texts of the pydoc topics in `split` (80/10/10 by a hash of the topic name)."""
    check_split(split)
    # Some topics share one text ("if" and "else"); the first name decides, so it is in one split.
    first_name = {}
    for name in sorted(topics):
        first_name.setdefault(topics[name], name)
    return [text for text, name in first_name.items() if split_of(name) == split]
