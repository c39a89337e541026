"""What exists: function and model specs, stored as objects in the ObjectStore."""

from registry._adapters import Adapters, AdapterSpec
from registry._bindings import Bindings, TriggerBinding, make_binding
from registry._registry import Registry, split_ref
from registry._specs import BUILTIN_MODELS, TINY_LLAMA, FunctionSpec, ModelSpec
from runtime import BindingError, UnknownBindingError, UnknownFunctionError

__all__ = [
    "BUILTIN_MODELS",
    "TINY_LLAMA",
    "AdapterSpec",
    "Adapters",
    "BindingError",
    "Bindings",
    "FunctionSpec",
    "ModelSpec",
    "Registry",
    "TriggerBinding",
    "UnknownBindingError",
    "UnknownFunctionError",
    "make_binding",
    "split_ref",
]
