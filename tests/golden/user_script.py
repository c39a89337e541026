"""The user script whose functions are the golden function artifacts.

``make_golden`` runs this file as ``__main__`` (as ``python script.py`` would), so
cloudpickle pickles its functions and its exception class by value, exactly as
it does for a researcher's script. What the artifacts embed by reference is
what the annotations and globals point at: ``faas.Model`` (``runtime._model``),
``faas.ObjectRef``, ``faas.Outputs``, a ``faas.Function`` and the ``faas`` module.
Do not edit: the committed artifacts hold this text.
"""

import faas

GREETING = "golden"


class TooShort(ValueError):
    """A user exception defined in the script."""


def _words(text: str) -> list[str]:
    return text.split()


def word_count(text: str) -> dict[str, int]:
    words = _words(text)
    if not words:
        raise TooShort("no words")
    return {"words": len(words), "chars": len(text)}


counter = faas.function(name="word-count")(word_count)


def summarise(model: faas.Model, text: str, n: int = 2) -> str:
    return model.generate(f"{GREETING}: {text}", {"max_new_tokens": n, "temperature": 0}).text


def convert(obj: faas.ObjectRef, out: faas.Outputs) -> str:
    if not isinstance(obj, faas.ObjectRef):
        raise faas.SubmitError(f"expected an ObjectRef, got {type(obj).__name__}")
    text = obj.read_text()
    out.put("counts.json", repr(sorted(counter.fn(text).items())))
    return text.upper()
