"""The ``@faas.function`` decorator and the ``Function`` it returns."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import re
import typing
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from faas.clients._protocol import default_client
from runtime import FunctionDefinitionError, Model, Priority, SubmitError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}")  # the registry's function names

if TYPE_CHECKING:
    from faas._future import Future
    from faas.clients._protocol import FaasClient
    from registry import FunctionSpec, TriggerBinding

R = TypeVar("R")
_PRIORITIES = ("interactive", "batch")


def _check_priority(priority: object) -> Priority | None:
    if priority is not None and priority not in _PRIORITIES:
        raise FunctionDefinitionError(f"priority must be 'interactive', 'batch' or None; got {priority!r}.")
    return priority  # type: ignore[return-value]


def _model_parameter(fn: Callable[..., Any]) -> tuple[str | None, int]:
    """Find the first parameter annotated ``faas.Model``: its name and 0 if it comes first, else -1."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None, 0
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to the raw annotations
        hints = {}
    for index, (pname, param) in enumerate(sig.parameters.items()):
        ann = hints.get(pname, param.annotation)
        is_model = ann is Model or (isinstance(ann, str) and ann.rsplit(".", 1)[-1] == "Model")
        if not is_model:
            continue
        if index > 0 and param.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise FunctionDefinitionError(
                f"{fn.__qualname__}: the faas.Model parameter {pname!r} is positional-only but not "
                "first; make it the first parameter or a keyword parameter."
            )
        first = index == 0 and param.kind is not inspect.Parameter.KEYWORD_ONLY
        return pname, 0 if first else -1
    return None, 0


def _default_name(fn: Callable[..., Any]) -> str:
    qualname = getattr(fn, "__qualname__", getattr(fn, "__name__", "function"))
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", qualname.replace("<locals>.", "")).lstrip(".-") or "function"


class Function(Generic[R]):
    """A registered-on-first-use function that runs in the pool.

    Do not build it directly; use ``@faas.function(...)``. The parameter
    annotated ``faas.Model`` receives the engine handle; callers never pass it.
    """

    def __init__(
        self,
        fn: Callable[..., R],
        *,
        model: str | None,
        timeout: float | None,
        retries: int,
        name: str | None,
        client: FaasClient | None = None,
        priority: Priority | None = None,
        origin: Function[R] | None = None,
    ) -> None:
        if not callable(fn) or isinstance(fn, type):
            raise FunctionDefinitionError(
                f"@faas.function decorates functions; got {type(fn).__name__} {fn!r}."
            )
        if timeout is not None and not timeout > 0:
            raise FunctionDefinitionError(f"timeout must be a positive number of seconds; got {timeout!r}.")
        if not isinstance(retries, int) or retries < 0:
            raise FunctionDefinitionError(f"retries must be an integer >= 0; got {retries!r}.")
        if model is not None and (not isinstance(model, str) or not model):
            raise FunctionDefinitionError(f"model must be a model name such as 'tiny-llama'; got {model!r}.")
        param, index = _model_parameter(fn)
        if model is not None and param is None:
            raise FunctionDefinitionError(
                f"{fn.__qualname__} asks for model {model!r} but has no parameter annotated "
                "faas.Model to receive the handle; add one, e.g. `def f(model: faas.Model, ...)`."
            )
        if model is None and param is not None:
            raise FunctionDefinitionError(
                f"{fn.__qualname__} has a faas.Model parameter {param!r} but the decorator names no "
                "model; use @faas.function(model='...')."
            )
        self.fn = fn
        self.model = model
        self.timeout = float(timeout) if timeout is not None else None
        self.retries = retries
        self.priority = _check_priority(priority)
        # The decorated function a with_options() copy came from: the client registers
        # that one (its priority is the registered default), once.
        self.origin: Function[R] = origin if origin is not None else self
        if name is not None and (not isinstance(name, str) or not _NAME.fullmatch(name)):
            raise FunctionDefinitionError(
                f"name must be letters, digits, '_', '.' or '-' (at most 128), starting with a letter "
                f"or '_'; got {str(name)[:80]!r}."
            )
        self.name = name or _default_name(fn)
        self.model_param = param
        self.model_param_index = index
        self._client = client
        self._signature = inspect.signature(fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<faas.Function {self.name} model={self.model!r}>"

    @property
    def client(self) -> FaasClient:
        """The client this function submits through (the default one unless bound)."""
        return self._client if self._client is not None else default_client()

    def with_client(self, client: FaasClient) -> Function[R]:
        """A copy of this function bound to ``client``."""
        return Function(
            self.fn,
            model=self.model,
            timeout=self.timeout,
            retries=self.retries,
            name=self.name,
            client=client,
            priority=self.priority,
        )

    def with_options(self, *, priority: Priority | None = None) -> Function[R]:
        """A copy of this function whose calls run with other per-call options.

        The copy is the same registered function (nothing is registered again);
        only its invocations differ::

            urgent = summarise.with_options(priority="interactive")
            urgent.remote(text)

        Args:
            priority: ``interactive`` or ``batch`` for this copy's calls
                (None: the decorator's).

        Raises:
            FunctionDefinitionError: An unknown priority.
        """
        return Function(
            self.fn,
            model=self.model,
            timeout=self.timeout,
            retries=self.retries,
            name=self.name,
            client=self._client,
            priority=_check_priority(priority) or self.origin.priority,
            origin=self.origin,
        )

    def bundle(self) -> tuple[bytes, FunctionSpec]:
        """The function's artifact (pickled with its source) and the spec to register it under.

        Raises:
            SerializationError: The function cannot be pickled.
        """
        from registry import FunctionSpec
        from runtime import bundle_function
        from runtime import digest_of as serde_digest_of
        from runtime import dumps as serde_dumps

        artifact = serde_dumps(bundle_function(self.fn), what=f"function {self.name!r}")
        spec = FunctionSpec(
            name=self.name,
            digest=serde_digest_of(artifact),
            model=self.model,
            model_param=self.model_param,
            model_param_index=self.model_param_index,
            timeout=self.timeout,
            retries=self.retries,
            priority=self.origin.priority,
            module=getattr(self.fn, "__module__", "") or "",
            qualname=getattr(self.fn, "__qualname__", "") or "",
        )
        return artifact, spec

    def check_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise SubmitError if ``args``/``kwargs`` do not fit the signature (model excluded)."""
        call_args: tuple[Any, ...] = args
        call_kwargs = dict(kwargs)
        if self.model_param is not None:
            if self.model_param in kwargs:
                raise SubmitError(
                    f"Do not pass {self.model_param!r} to {self.name}: the pool passes the model handle."
                )
            if self.model_param_index == 0:
                call_args = (None, *args)
            else:
                call_kwargs[self.model_param] = None
        try:
            self._signature.bind(*call_args, **call_kwargs)
        except TypeError as exc:
            raise SubmitError(f"Bad arguments for {self.name}: {exc}.") from None

    # -- calling ---------------------------------------------------------------
    def submit(self, *args: Any, **kwargs: Any) -> Future[R]:
        """Start an invocation and return its ``faas.Future`` at once."""
        return self.client.submit(self, args, kwargs)

    def remote(self, *args: Any, **kwargs: Any) -> R:
        """Run in the pool and wait for the result."""
        return self.client.call(self, args, kwargs)  # type: ignore[no-any-return]

    def map(
        self,
        *iterables: Iterable[Any],
        kwargs: dict[str, Any] | None = None,
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> Iterator[R | BaseException]:
        """Run once per element (zipped across ``iterables``); yield results in input order.

        All invocations are submitted before the first result is awaited, so
        they run concurrently.

        Args:
            iterables: One iterable per positional parameter.
            kwargs: Keyword arguments passed to every invocation.
            return_exceptions: Yield an invocation's exception instead of raising it.
            timeout: Seconds to wait for all results.
        """
        extra = kwargs or {}
        calls = [(tuple(items), extra) for items in zip(*iterables, strict=False)]
        futures: list[Future[R]] = self.client.submit_many(self, calls)
        return _in_order(futures, return_exceptions, timeout)

    async def aio(self, *args: Any, **kwargs: Any) -> R:
        """Run in the pool and await the result from asyncio."""
        return await asyncio.wrap_future(self.submit(*args, **kwargs))

    def local(self, *args: Any, **kwargs: Any) -> R:
        """Run in this process (for debugging), against the pool's engine when there is a model."""
        self.check_arguments(args, kwargs)
        if self.model_param is None:
            return self.fn(*args, **kwargs)
        handle = self.client.model_handle(self.model or "")
        if self.model_param_index == 0:
            return self.fn(handle, *args, **kwargs)
        return self.fn(*args, **{**kwargs, self.model_param: handle})

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        """Same as :meth:`local`."""
        return self.local(*args, **kwargs)

    # -- triggers (see faas/triggers/_binding.py) ------------------------------------------------
    def on_object(self, **options: Any) -> TriggerBinding:
        """Bind this function to new objects in a bucket; it runs once per new object version.

        The function receives a ``faas.ObjectRef``; its return value is written to
        ``output_prefix + <key below the prefix's directory> + output_suffix``.
        Run the bindings with ``faas.triggers.TriggerRunner`` or ``faas triggers run``.

        Args:
            options: ``bucket`` and ``output_prefix`` (required), ``prefix``,
                ``suffix``, ``output_suffix``, ``output_bucket``, ``name``,
                ``queue_url``, ``poll_interval``, ``max_concurrency``,
                ``max_attempts``, ``lease_seconds``, ``process_existing``,
                ``reprocess``, ``storage``, ``endpoint_url``, ``region``,
                ``path_style`` (see ``faas.triggers.TriggerBinding``).

        Returns:
            The stored binding.

        Raises:
            BindingError: The binding is malformed (nothing is registered or stored).
        """
        from faas.triggers._binding import bind_function

        return bind_function(self, **options)


def _in_order(
    futures: list[Future[R]], return_exceptions: bool, timeout: float | None
) -> Iterator[R | BaseException]:
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for fut in futures:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                yield fut.result(remaining)
            except concurrent.futures.TimeoutError:
                raise
            except Exception as exc:
                if not return_exceptions:
                    raise
                yield exc
    finally:
        for fut in futures:
            fut.cancel()  # no-op for finished ones; stops the rest if the caller stops early


def function(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    model: str | None = None,
    timeout: float | None = None,
    retries: int = 0,
    name: str | None = None,
    priority: Priority | None = None,
) -> Callable[[Callable[..., R]], Function[R]]:
    """Decorate a function so it runs in the warm pool.

    Use it with parentheses and keyword options only::

        @faas.function(model="tiny-llama", timeout=60, retries=1)
        def complete(model: faas.Model, prompt: str) -> str: ...

    Args:
        fn: Must not be given: bare ``@faas.function`` is an error.
        model: Model name (``name`` resolves the ``latest`` alias at submit
            time; ``name@version`` pins a version). The parameter annotated
            ``faas.Model`` receives its handle.
        timeout: Seconds an invocation may run before it fails with
            ``faas.InvocationTimeout``.
        retries: Times an invocation lost with its worker or engine is retried.
        name: Registered name (default: the function's qualified name).
        priority: ``interactive`` or ``batch`` (default None, which counts as
            interactive): within your tenant's share of an engine, interactive
            invocations are admitted first, and the engine gets the priority
            when it runs with priority scheduling. Override it per call with
            :meth:`Function.with_options`.

    Raises:
        FunctionDefinitionError: Used without parentheses, on a non-callable,
            or with options that do not fit the function.
    """
    if fn is not None:
        raise FunctionDefinitionError(
            "Use @faas.function(...) with parentheses and keyword options, e.g. "
            "@faas.function(model='tiny-llama'); bare @faas.function is not supported."
        )

    def decorate(f: Callable[..., R]) -> Function[R]:
        return Function(f, model=model, timeout=timeout, retries=retries, name=name, priority=priority)

    return decorate
