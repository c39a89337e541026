"""What exists: function and model specs, stored as objects in the ObjectStore."""

from registry._bindings import BindingError, Bindings, TriggerBinding, UnknownBindingError
from registry._registry import Registry, UnknownFunctionError, split_ref
from registry._specs import BUILTIN_MODELS, TINY_LLAMA, FunctionSpec, ModelSpec

__all__ = [
    "BUILTIN_MODELS",
    "TINY_LLAMA",
    "BindingError",
    "Bindings",
    "FunctionSpec",
    "ModelSpec",
    "Registry",
    "TriggerBinding",
    "UnknownBindingError",
    "UnknownFunctionError",
    "split_ref",
]
