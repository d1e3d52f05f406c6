"""Every documented command runs (STYLE.md item 20).

The commands are collected, not copied: the fenced ``bash`` blocks of README.md (each
``&&`` part a command of its own, ``# or: CMD`` comments too), the README's inline
invocations (`` `sct-export-model --workdir W -o MODEL_DIR` ``, `` `python -m ...` ``), and
the indented command lines of every ``configs/*.py`` docstring (``\\`` continuations
joined). Each one runs as a subprocess (``bash -c``) with the interpreter's environment
first on PATH, so a moved module, a renamed flag or a config variant that no longer
exists fails here.

Where they run: one sandbox folder per module that looks like a checkout (``configs``,
``train.py``, ... are symlinks to this repository, ``.venv`` to ``sys.prefix``) and holds
what a user brings: ``data/synthrad2023`` (the phantom's pelvis and brain cases, written
by ``python -m sct_jax.data.phantom``), ``mr.nii.gz`` and ``case/mr.nii.gz`` (one phantom
MR), ``mr_dicom/`` (that MR as a DICOM series) and torchvision's two ``.pth`` files (random
weights in torchvision's layout; without torch installed a stub ``torch.load`` reads them:
see :func:`_write_pth`).

Rewriting to ``tiny`` size, the only changes made to a documented command (``rewrite``):

1. a config spec ``configs/X.py[:words]`` loses ``small`` and gains ``tiny``; what its
   size decides otherwise is spelled out (the LDM's stage and conditioning: ``:diffusion,
   small`` is the concat UNet, so it becomes ``:diffusion,tiny,concat``);
2. a run directory named after a config, ``runs/<name>``, becomes ``runs/<tiny name>``
   (``runs/pix2pix_pelvis_small`` -> ``runs/pix2pix_pelvis_tiny``), and
   ``runs/reproduce/<seed>`` becomes ``runs/reproduce/<seed>_tiny``, so the commands of
   one model share one run, as the documented chains share theirs;
3. an absolute path is re-rooted in the sandbox (``/data/synthrad2023`` ->
   ``data/synthrad2023``, ``/tmp/tiny`` -> ``tmp/tiny``);
4. counts and sizes shrink: ``--seeds`` 1 (2 with ``--vmap``), ``--steps``,
   ``--samples``, ``--config.train.steps=`` and ``--config.train.batch_size=`` 2, the
   phantom's ``--cases`` 4 at the tiny shape ``--shape 48 32 8``, a benchmark's
   ``--models reduced`` (a fixed mid-size LDM) the config's own ``configured`` one;
5. ``sct-reproduce`` gets ``--tiny``, and ``--seeds 1`` and ``--only`` one row
   (:data:`REPRODUCE_ONLY`) when it names none: every row at tiny size is
   tests/test_reproduce.py's, here the command line is what is checked;
6. ``srun <options>`` is dropped (one process; the launch is SLURM's);
7. elided arguments (``...``) are spelled out in :data:`ELIDED`, placeholders
   (``W``, ``MODEL_DIR``) in :data:`PLACEHOLDERS`;
8. a script, module or benchmark named without arguments in the prose (``python -m
   sct_jax.predict``, ``sct-bench fsdp_memory``) runs with ``--help``; the no-argument
   demo (``python train.py``) runs its own code path with
   ``sct_jax.experiment.DEMO_CONFIG`` at ``tiny``;
9. a benchmark given options (``sct-bench NAME ...``, ``python -m sct_jax.bench.NAME
   ...``) gets the arguments the ``quick`` suite gives it first (the documented ones
   follow, so they win).

What cannot run here is in :data:`EXCLUDED`, each with its reason (and a cheap check
where one exists); a documented non-zero exit status that a tiny model earns is in
:data:`EXPECTED_EXIT`; what fails today on a known bug is in :data:`XFAIL` (strict:
the mark must go when the bug is fixed). Commands whose outputs others read (a run
directory, ``sct.nii.gz``, ``weights/vgg16.npz``) are run first when needed, once: a
command is never run twice in a session with the same text, its result is reused.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from sct_jax.config_utils import load_config_file

# Minutes of training and prediction: its own run (pytest -m docs), which CI runs after
# the suite (.ci/run), so that the suite stays within its budget.
pytestmark = pytest.mark.docs

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
# configs/_*.py are shared helpers of the configs, not experiments.
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.py") if not p.name.startswith("_"))
TIMEOUT_S = 600

# A shell line that starts like this is a command (bash blocks: every line is one).
COMMAND_START = re.compile(r"^(python3?\s|sct-[\w-]+|\.venv/bin/|pip\s|\.\s)")

# (pattern on the documented text, why it does not run, a cheap command checked instead
# or None). Keep this short: everything else runs.
EXCLUDED = [
    (r"^python3 -m venv |^(\.venv/bin/)?pip install ",
     "creates or changes the environment the suite itself runs in (CI does it first)", None),
    (r"^\.venv/bin/python -m pytest( -m docs)?$", "the whole suite, or this file's own run", None),
    (r"^tensorboard ", "a server that runs until stopped; TensorBoard is not a dependency",
     None),
    (r"^python -c \"import torchvision",
     "downloads ImageNet weights (torchvision and the network); the converter runs on "
     "random weights in the same format instead", None),
    (r"^python tests/test_bad_inputs\.py$",
     "rewrites README.md's table in the checkout; its cases are tests of the suite", None),
    (r"^sct-bench --suite (\w+)",
     "a whole benchmark suite: minutes on a CPU, or an accelerator; the suite must exist",
     "sct-bench --list"),
]

# Elided arguments (``...``) of a documented command -> what runs in their place.
ELIDED = {
    # tiny has no perceptual term: switched on, so the converted file is really read.
    "python train.py --config configs/pgan_pelvis.py "
    "--config.model.vgg16_weights=weights/vgg16.npz ...":
        "--config.loss.perceptual_weight=1 --workdir runs/pgan_pelvis_vgg16",
    "sct-ablate ... --seeds 4 --vmap":
        "--config configs/pix2pix_pelvis.py --workdir runs/ablate_vmap",
}
# Placeholder words of the prose -> their value in the sandbox.
PLACEHOLDERS = {"W": "runs/pix2pix_pelvis_small", "MODEL_DIR": "exported_model"}

# (pattern on the documented text, exit statuses accepted, why). A non-zero status
# accepted here still needs the command's outputs written.
EXPECTED_EXIT = [
    (r"^python -m sct_jax\.cli\.qa --(mr|cbct) ", (0, 1),
     "the sCT of a 2-step model fails the QA checks: exit 1 is the documented 'QA: fail'"),
]

# documented text -> the bug that makes it fail today (strict xfail: remove when fixed).
# Empty now; it held the ControlNet stage's "donate the same buffer twice" and the
# vmapped pix2pix "Batching rule for 'linear_call'" until main fixed them.
XFAIL: dict[str, str] = {}

# The tiny phantom that pix2pix_pelvis.py:tiny trains on (its cached dataset has the
# same cases), so predictions of that run can be scored against data/synthrad2023.
PHANTOM_ARGS = ["--region", "pelvis", "--cases", "4", "--seed", "0", "--shape", "48", "32",
                "8"]
# Brain heads beside them, as in the challenge's release (``sct-reproduce seed03 --data``):
# the tiny brain configs' phantom, 32^3.
PHANTOM_BRAIN_ARGS = ["--region", "brain", "--cases", "4", "--seed", "0", "--shape", "32",
                      "32", "32"]


@dataclass(frozen=True)
class DocCommand:
    """One documented command: where it is written and its text (comments stripped,
    continuations joined, whitespace collapsed)."""
    source: str
    text: str

    @property
    def id(self) -> str:
        short = re.sub(r"\s+", "_", self.text)
        return f"{self.source}:{short[:90]}"


# ------------------------------------------------------------------------ collection


def _strip_comment(line: str) -> tuple[str, str]:
    """``(code, comment)``: the comment starts at a ``#`` outside quotes that begins the
    line or follows whitespace."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def _logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Joins ``\\`` continuations; ``(line number of the first, text)``."""
    out, pending, start = [], "", None
    for lineno, line in lines:
        code = line.rstrip()
        if start is None:
            start = lineno
        if code.endswith("\\"):
            pending += code[:-1] + " "
            continue
        out.append((start, pending + code))
        pending, start = "", None
    if pending:
        out.append((start, pending))
    return out


def _split_shell_line(text: str) -> list[str]:
    """A shell line -> its commands: the comment dropped (a ``# or: CMD`` comment is a
    command too), ``&&`` parts separated, whitespace collapsed."""
    code, comment = _strip_comment(text)
    parts = [p for p in re.split(r"\s&&\s", code)]
    if comment.startswith("or:"):
        parts.append(comment[3:])
    return [" ".join(p.split()) for p in parts if p.strip()]


def readme_commands() -> list[DocCommand]:
    lines = README.read_text().splitlines()
    commands, prose = [], []
    in_block, shell = False, False
    block: list[tuple[int, str]] = []
    for lineno, line in enumerate(lines, 1):
        fence = re.match(r"^\s*```(\w*)\s*$", line)
        if fence:
            if in_block and shell:
                for start, text in _logical_lines(block):
                    commands += [DocCommand(f"README.md:{start}", c)
                                 for c in _split_shell_line(text)]
            in_block, shell, block = not in_block, fence.group(1) in ("bash", "sh"), []
            prose.append("")
            continue
        if in_block:
            block.append((lineno, line))
            prose.append("")
        else:  # a table row's code spans name things (`sct-predict -m`), not commands
            prose.append("" if line.lstrip().startswith("|") else line)
    # Inline invocations in the prose: a code span that starts like a command and has
    # arguments (bare names such as `sct-qa` are checked by test_readme_names_console_scripts).
    text = "\n".join(prose)
    for m in re.finditer(r"`([^`]+)`", text):
        span = " ".join(m.group(1).split())
        if COMMAND_START.match(span + " ") and " " in span:
            lineno = text.count("\n", 0, m.start()) + 1
            commands.append(DocCommand(f"README.md:{lineno}", span))
    return sorted(commands, key=lambda c: int(c.source.rsplit(":", 1)[1]))


def config_commands(path: Path) -> list[DocCommand]:
    """The indented command lines of a config's module docstring."""
    module = ast.parse(path.read_text())
    doc_node = module.body[0]
    doc = ast.get_docstring(module, clean=False) or ""
    first = doc_node.lineno  # the docstring's first line is the file's line `first`
    lines = [(first + i, line) for i, line in enumerate(doc.splitlines())]
    commands, block = [], []
    for lineno, line in lines:
        stripped = line.strip()
        indented = line[:1].isspace()
        if indented and (block and block[-1][1].rstrip().endswith("\\")
                         or COMMAND_START.match(stripped + " ")):
            block.append((lineno, stripped))
    for start, text in _logical_lines(block):
        commands += [DocCommand(f"configs/{path.name}:{start}", c)
                     for c in _split_shell_line(text)]
    return commands


@functools.cache
def documented_commands() -> tuple[DocCommand, ...]:
    found = readme_commands()
    for path in CONFIGS:
        found += config_commands(path)
    return tuple(found)


def excluded(cmd: DocCommand):
    """``(reason, cheap check or None)`` when ``cmd`` is excluded, else None."""
    for pattern, reason, cheap in EXCLUDED:
        if re.search(pattern, cmd.text):
            return reason, cheap
    return None


# ------------------------------------------------------------------------ rewriting

# The demo's code path (train.py with no flags) at tiny size: train, export, evaluate.
DEMO_TINY = ("import runpy, sys; from sct_jax import experiment; "
             "experiment.DEMO_CONFIG = 'configs/pix2pix_pelvis.py:tiny'; sys.argv = ['train.py']; "
             "runpy.run_path('train.py', run_name='__main__')")
CONFIG_SPEC = re.compile(r"^(?P<pre>--config=)?(?P<path>configs/\w+\.py)(?::(?P<words>[\w,]*))?$")
LDM_CONDITIONING_WORDS = {"concat": "concat", "none": "unconditional"}


@functools.cache
def _config(path: str, words: tuple[str, ...]):
    spec = path + (":" + ",".join(words) if words else "")
    return load_config_file(str(REPO / spec))


def tiny_words(path: str, words: tuple[str, ...]) -> tuple[str, ...]:
    """Rule 1: the variant words of the tiny counterpart of ``path:words``."""
    new = [w for w in words if w != "small"] + ([] if "tiny" in words else ["tiny"])
    orig, tiny = _config(path, words), _config(path, tuple(new))
    if "ldm" in orig and orig.method != "ldm_autoencoder":
        if tiny.method != orig.method:
            new.append(orig.method.removeprefix("ldm_"))
        if tiny.ldm.conditioning != orig.ldm.conditioning:
            new.append(LDM_CONDITIONING_WORDS[orig.ldm.conditioning])
        tiny = _config(path, tuple(new))
        assert (tiny.method, tiny.ldm.conditioning) == (orig.method, orig.ldm.conditioning)
    return tuple(new)


def _spec_words(spec: str) -> tuple[str, tuple[str, ...]]:
    path, _, words = spec.partition(":")
    return path, tuple(w for w in words.split(",") if w)


@functools.cache
def run_name_map() -> dict[str, str]:
    """Rule 2: ``name`` of a config -> the name of its tiny counterpart, for every config
    at full and small size and every spec written in the documentation."""
    specs = {(f"configs/{p.name}", ()) for p in CONFIGS}
    specs |= {(f"configs/{p.name}", ("small",)) for p in CONFIGS}
    texts = [c.text for c in documented_commands()] + [README.read_text()]
    texts += [p.read_text() for p in CONFIGS]
    for text in texts:
        for m in re.finditer(r"(configs/\w+\.py)(?::([\w,]+))?", text):
            path, words = m.group(1), tuple(w for w in (m.group(2) or "").split(",") if w)
            if (REPO / path).is_file() and "tiny" not in words:
                specs.add((path, words))
    names = {}
    for path, words in sorted(specs):
        try:
            name = _config(path, words).name
        except Exception:  # noqa: BLE001 - a bad spec is the command's own failure
            continue
        tiny = _config(path, tiny_words(path, words)).name
        assert names.setdefault(name, tiny) == tiny, (name, tiny, names[name])
    names.update({tiny: tiny for tiny in list(names.values())})
    return names


def _rename_runs(value: str) -> str:
    names = run_name_map()

    def sub(m):
        if m.group(2) in REPRODUCE_ONLY and m.group(1) == "reproduce/":
            return f"runs/reproduce/{m.group(2)}_tiny"
        return f"runs/{m.group(1) or ''}{names.get(m.group(2), m.group(2))}"

    return re.sub(r"\bruns/(reproduce/)?([\w.-]+)", sub, value)


def _program(tokens: list[str]) -> str:
    """What a command runs: ``train.py``, ``sct-predict``, ``sct_jax.cli.qa``, ..."""
    if not tokens:
        return ""
    first = os.path.basename(tokens[0])
    if first in ("python", "python3") and len(tokens) > 1:
        if tokens[1] == "-m" and len(tokens) > 2:
            return tokens[2]
        return os.path.basename(tokens[1]) if tokens[1] != "-c" else "-c"
    return first


REPRODUCE = ("sct-reproduce", "sct_jax.reproduce")
# Rule 5: the row a seed command trains when it names none (every row at tiny size is
# tests/test_reproduce.py's; here the command line is what is checked).
REPRODUCE_ONLY = {"seed02": "pgan", "seed03": "pix2pix", "synthrad_task2": "pix2pix"}


def rewrite(cmd: DocCommand) -> list[str]:
    """The documented command at tiny size, as argv tokens (rules in the module doc)."""
    text = cmd.text
    if "..." in text:
        assert text in ELIDED, f"{cmd.source}: elided arguments; add {text!r} to ELIDED"
        text = text.replace("...", ELIDED[text])
    tokens = shlex.split(text)
    if tokens[0] == "srun":  # rule 6
        while tokens and not COMMAND_START.match(tokens[0] + " "):
            tokens.pop(0)
    program = _program(tokens)
    if program == "train.py" and len(tokens) == 2:  # rule 8: the no-argument demo
        return [tokens[0], "-c", DEMO_TINY]
    bare = len(tokens) == 2 or (len(tokens) == 3 and tokens[1] == "-m")
    if bare and (tokens[0] in ("python", "python3") or _benchmark(tokens)):  # rule 8
        return tokens + ["--help"]
    out: list[str] = []
    i = 0
    has_vmap = "--vmap" in tokens
    while i < len(tokens):
        tok = tokens[i]
        tok = PLACEHOLDERS.get(tok, tok)  # rule 7
        spec = CONFIG_SPEC.match(tok)
        if spec:  # rule 1
            path, words = spec.group("path"), tuple(
                w for w in (spec.group("words") or "").split(",") if w)
            tok = (spec.group("pre") or "") + path + ":" + ",".join(tiny_words(path, words))
        elif tok.startswith("/") and not tok.startswith("//"):  # rule 3
            tok = tok.lstrip("/")
        count = {"--seeds": "2" if has_vmap else "1", "--steps": "2", "--samples": "2",
                 "--cases": "4"}
        if tok in count and i + 1 < len(tokens):  # rule 4
            out += [tok, count[tok]]
            i += 2
            continue
        if tok == "--models" and tokens[i + 1:i + 2] == ["reduced"]:  # rule 4: a size
            out += [tok, "configured"]
            i += 2
            continue
        tok = re.sub(r"^(--config\.train\.(steps|batch_size))=\d+$", r"\1=2", tok)
        if "=" in tok and tok.startswith("--"):
            key, _, value = tok.partition("=")
            if value.startswith("/"):
                value = value.lstrip("/")
            tok = f"{key}={_rename_runs(value)}"
        else:
            tok = _rename_runs(tok)
        out.append(tok)
        i += 1
    if program in REPRODUCE:  # rule 5
        out += [] if "--tiny" in out else ["--tiny"]
        out += [] if "--seeds" in out else ["--seeds", "1"]
        seed = next(t for t in out if t in REPRODUCE_ONLY)
        out += [] if "--only" in out else ["--only", REPRODUCE_ONLY[seed]]
    if program == "sct_jax.data.phantom" and "--shape" not in out:  # rule 4
        out += ["--shape", "48", "32", "8"]
    bench = _benchmark(out)
    if bench is not None:  # rule 9
        name, at = bench
        out[at:at] = _quick_suite().get(name, [])
    return out


@functools.cache
def _quick_suite() -> dict[str, list[str]]:
    """Benchmark name -> its arguments in the ``quick`` suite (the project's smoke size)."""
    from sct_jax.bench import run as bench_run

    args = {}
    for name, entry in bench_run.SUITES["quick"]:
        args.setdefault(name, list(entry))
    return args


def _benchmark(argv: list[str]):
    """``(benchmark name, index where its arguments start)`` of a benchmark command."""
    from sct_jax.bench import run as bench_run

    program = _program(argv)
    if program in ("sct-bench", "sct_jax.cli.bench"):
        at = 1 if program == "sct-bench" else 3
        if len(argv) > at and argv[at] in bench_run.BENCHMARKS:
            return argv[at], at + 1
    if program.startswith("sct_jax.bench.") and program.split(".")[-1] in bench_run.BENCHMARKS:
        return program.split(".")[-1], 3
    return None


# -------------------------------------------------------------- inputs and outputs

_OUTPUT_FLAGS = ("-o", "--output", "--out", "--report", "--png")
_TRAINERS = ("train.py", "sct-train")
_EVALUATORS = ("evaluate.py", "sct-evaluate")


def _flag_values(argv: list[str]) -> list[tuple[str, str]]:
    """``(flag, value)`` pairs of ``--flag value`` and ``--flag=value``."""
    pairs = []
    for i, tok in enumerate(argv):
        if tok.startswith("-") and "=" in tok:
            key, _, value = tok.partition("=")
            pairs.append((key, value))
        elif tok.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            pairs.append((tok, argv[i + 1]))
    return pairs


def outputs(argv: list[str]) -> list[str]:
    """What a command writes that other commands may read (sandbox-relative paths)."""
    program = _program(argv)
    pairs = _flag_values(argv)
    outs = [v for k, v in pairs if k in _OUTPUT_FLAGS]
    workdirs = [v for k, v in pairs if k == "--workdir"]
    if program in _TRAINERS or program in ("sct_jax.cli.ablate", "sct-ablate"):
        outs += workdirs
    if program in _EVALUATORS and workdirs and not any(k == "--pred" for k, _ in pairs):
        outs += [f"{workdirs[0]}/predictions"]
    if program in REPRODUCE and not any(k == "--out" for k, _ in pairs):
        seed = next(t for t in argv[1:] if t in REPRODUCE_ONLY)
        data = dict(pairs).get("--data")  # a user's data: runs/reproduce/<seed>_<name>...
        name = f"{seed}_{Path(data).name}" if data else seed
        region = dict(pairs).get("--region") if data else None
        name += f"_{region}" if region else ""
        outs.append(f"runs/reproduce/{name}{'_tiny' if '--tiny' in argv else ''}")
    return [o.rstrip("/") for o in outs]


def implicit_inputs(argv: list[str]) -> list[str]:
    """Files a command's config reads without naming them: the LDM's earlier stages and
    VGG weights at their default paths."""
    program = _program(argv)
    specs = [v for k, v in _flag_values(argv) if k == "--config" and CONFIG_SPEC.match(v)]
    if program not in _TRAINERS + _EVALUATORS or not specs:
        return []
    path, words = _spec_words(specs[0])
    config = _config(path, words)
    needs = []
    if "ldm" in config and config.method != "ldm_autoencoder":
        needs.append(config.ldm.autoencoder_workdir)
        if config.method == "ldm_controlnet":
            needs.append(config.ldm.diffusion_workdir)
    if "loss" in config and config.loss.get("perceptual_weight", 0):
        needs.append(config.model.vgg16_weights)
    if config.method == "ctx_pgan":
        needs.append(config.model.vgg19_weights)
    return needs


@dataclass
class Planned:
    doc: DocCommand
    argv: list[str]

    @property
    def line(self) -> str:
        return shlex.join(self.argv)


def plan() -> list[Planned]:
    return [Planned(c, rewrite(c)) for c in documented_commands() if not excluded(c)]


# ------------------------------------------------------------------------- sandbox


def _write_pth(path: Path, arch: str, seed: int) -> None:
    """torchvision's ``features.*`` state dict of ``arch`` with random values.

    With torch installed, a real ``.pth`` (``torch.save``); without it, the arrays in an
    ``.npz`` under the ``.pth`` name, which the stub ``torch`` module of
    :func:`_torch_stub` loads (only scripts/convert_vgg_weights.py gets the stub).
    """
    from sct_jax.models import vgg

    rng = np.random.default_rng(seed)
    params = {name: {"kernel": rng.normal(0, (2.0 / (9 * c_in)) ** 0.5,
                                          (3, 3, c_in, c_out)).astype(np.float32),
                     "bias": np.zeros(c_out, np.float32)}
              for name, _, c_in, c_out in vgg.vgg_conv_layout(arch)}
    state = vgg.state_dict_from_params(params, arch)
    try:
        import torch  # noqa: PLC0415 - optional
    except ImportError:
        with open(path, "wb") as f:
            np.savez(f, **state)
    else:
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                   path)


_TORCH_STUB = '''"""A stand-in for torch.load only (tests/test_documented_commands.py): reads the
.npz that the test wrote under a .pth name."""
import numpy as np


class _Tensor:
    def __init__(self, array):
        self._array = array

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self._array


def load(path, map_location=None, weights_only=True):
    with np.load(path) as arrays:
        return {key: _Tensor(arrays[key]) for key in arrays.files}
'''


def _torch_stub(root: Path) -> Path | None:
    """A folder holding the stub ``torch`` module, or None when torch is installed."""
    try:
        import torch  # noqa: F401, PLC0415
        return None
    except ImportError:
        folder = root / ".torch_stub"
        folder.mkdir(exist_ok=True)
        (folder / "torch.py").write_text(_TORCH_STUB)
        return folder


def _write_dicom_series(mr_path: Path, folder: Path) -> None:
    """The MR as a DICOM MR Image Storage series (axial slices on its own grid)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from sct_jax.data.io import load_volume
    from sct_jax.export.dicom import slice_geometry

    mr = load_volume(mr_path)
    data = np.clip(np.rint(np.asarray(mr.data, np.float64)), 0, 65535).astype(np.uint16)
    geometry = slice_geometry(mr.affine, data.shape)
    folder.mkdir()
    study, frame, series = generate_uid(), generate_uid(), generate_uid()
    for k in range(data.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SpecificCharacterSet = "MR", "ISO_IR 100"
        ds.PatientName, ds.PatientID = "Phantom^Pelvis", "PHANTOM-1"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.PatientPosition = "20240305", "101500", "HFS"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in geometry["positions"][k]]
        ds.ImageOrientationPatient = [float(v) for v in geometry["orientation"]]
        ds.PixelSpacing = [float(v) for v in geometry["pixel_spacing"]]
        ds.SliceThickness = float(geometry["slice_spacing"])
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T).tobytes()
        ds.save_as(folder / f"MR{k + 1:04d}.dcm", enforce_file_format=True)


class Sandbox:
    """The folder the commands run in, and what ran there (one result per command text)."""

    def __init__(self, root: Path, planned: list[Planned]):
        self.root = root
        self.results: dict[str, tuple[int, str, float]] = {}
        self.producers: dict[str, Planned] = {}
        for p in planned:
            for out in outputs(p.argv):
                self.producers.setdefault(out, p)
        bin_dir = os.path.dirname(sys.executable)
        self.env = dict(os.environ)
        self.env["PATH"] = bin_dir + os.pathsep + self.env.get("PATH", "")
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        self.torch_stub = None

    def setup(self) -> None:
        """A checkout-like folder, and the files a user brings."""
        for entry in REPO.iterdir():
            if entry.name not in (".git", ".venv", "runs", "weights", "data", "tmp"):
                (self.root / entry.name).symlink_to(entry)
        (self.root / ".venv").symlink_to(sys.prefix)
        data = self.root / "data" / "synthrad2023"
        for args in (PHANTOM_ARGS, PHANTOM_BRAIN_ARGS):
            self.call([sys.executable, "-m", "sct_jax.data.phantom", "--out", str(data),
                       *args], check=True)
        case = sorted((data / "Task1" / "pelvis").glob("*/mr.nii.gz"))[-1].parent
        (self.root / "mr.nii.gz").symlink_to(case / "mr.nii.gz")
        (self.root / "case").symlink_to(case)
        _write_dicom_series(case / "mr.nii.gz", self.root / "mr_dicom")
        _write_pth(self.root / "vgg16-397923af.pth", "vgg16", 0)
        _write_pth(self.root / "vgg19-dcbb9e9d.pth", "vgg19", 1)
        self.torch_stub = _torch_stub(self.root)

    def call(self, argv: list[str], check: bool = False, extra_path: Path | None = None):
        env = self.env
        if extra_path is not None:
            env = dict(env, PYTHONPATH=f"{extra_path}{os.pathsep}{env['PYTHONPATH']}")
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "-c", shlex.join(argv)], cwd=self.root, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        wall = time.perf_counter() - t0
        if check:
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.returncode, proc.stdout + proc.stderr, wall

    def needs(self, p: Planned) -> list[str]:
        """The outputs of other commands that ``p`` reads."""
        own = set(outputs(p.argv))
        values = [v for _, v in _flag_values(p.argv)] + p.argv[1:] + implicit_inputs(p.argv)
        # a list flag's value names several (evaluate.py --ensemble RUN2,RUN3)
        values += [part for v in values if "," in v for part in v.split(",")]
        found = []
        for value in values:
            for out in self.producers:
                if out in own or out in found:
                    continue
                if value.rstrip("/") == out or value.startswith(out + "/"):
                    found.append(out)
        return found

    def run(self, p: Planned, stack: tuple[str, ...] = ()) -> tuple[int, str, float]:
        if p.line in self.results:
            return self.results[p.line]
        for need in self.needs(p):
            producer = self.producers[need]
            if not (self.root / need).exists() and producer.line not in stack:
                rc, log, _ = self.run(producer, stack + (p.line,))
                if rc != 0 and not (self.root / need).exists():
                    return 1, f"prerequisite failed: {producer.doc.id}\n{log}", 0.0
        stub = self.torch_stub if "convert_vgg_weights.py" in p.line else None
        self.results[p.line] = self.call(p.argv, extra_path=stub)
        return self.results[p.line]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    box = Sandbox(tmp_path_factory.mktemp("documented_commands"), plan())
    box.setup()
    return box


# --------------------------------------------------------------------------- tests


def test_collector_finds_the_documented_commands():
    commands = documented_commands()
    readme = [c for c in commands if c.source.startswith("README")]
    configs = [c for c in commands if c.source.startswith("configs/")]
    assert len(readme) >= 30 and len(configs) >= 20, (len(readme), len(configs))
    for path in CONFIGS:  # every config documents at least how to train and evaluate it
        texts = [c.text for c in configs if c.source.startswith(f"configs/{path.name}:")]
        assert any(t.startswith("python train.py") for t in texts), path.name
        assert any(t.startswith("python evaluate.py") for t in texts), path.name
    texts = {c.text.split(" --")[0] for c in readme}
    for expected in ("python -m sct_jax.cli.ablate", "sct-reproduce seed02",
                     "python -m sct_jax.cli.qa", "python -m sct_jax.cli.export_dicom",
                     ".venv/bin/sct-predict -i mr.nii.gz -o sct.nii.gz -m runs/pix2pix_pelvis_small",
                     "python -m sct_jax.reproduce seed02", "sct-export-model"):
        assert expected in texts, expected


def test_every_command_is_run_or_excluded():
    """No silent drop: every collected command rewrites to a runnable tiny command (no
    elision left, nothing outside the sandbox, no full-size config) or is excluded; and
    every EXCLUDED entry still matches a documented command."""
    commands = documented_commands()
    for cmd in commands:
        if excluded(cmd):
            continue
        argv = rewrite(cmd)
        assert "..." not in argv, cmd
        assert not any(a.startswith("/") and not a.startswith(str(REPO)) for a in argv[1:]
                       if a != "-c"), (cmd, argv)
        for value in [v for _, v in _flag_values(argv)] + argv:
            m = CONFIG_SPEC.match(value)
            if m:
                assert "tiny" in (m.group("words") or "").split(","), (cmd, argv)
    for pattern, _, _ in EXCLUDED:
        assert any(re.search(pattern, c.text) for c in commands), f"stale EXCLUDED {pattern}"
    for text in list(ELIDED) + list(XFAIL):
        assert any(c.text == text for c in commands), f"stale entry {text!r}"
    for pattern, _, _ in EXPECTED_EXIT:
        assert any(re.search(pattern, c.text) for c in commands), f"stale {pattern}"


def test_readme_names_console_scripts():
    """Every ``sct-*`` name the README gives is a console script of pyproject.toml."""
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]", 1)[1]
    scripts = set(re.findall(r"^([\w-]+)\s*=", section.split("\n[", 1)[0], flags=re.M))
    named = set(re.findall(r"`(sct-[a-z-]+)`", README.read_text()))
    named |= {c.text.split()[0] for c in documented_commands() if c.text.startswith("sct-")}
    assert named and named <= scripts, named - scripts


def test_demo_leaves_the_run_the_readme_names():
    """``python train.py`` trains DEMO_CONFIG into the folder `sct-predict -m` reads."""
    from sct_jax import experiment

    config = load_config_file(str(REPO / experiment.DEMO_CONFIG))
    assert config.name == "pix2pix_pelvis_small"
    assert str(experiment.default_workdir(config)) == "runs/pix2pix_pelvis_small"
    assert "`runs/pix2pix_pelvis_small`" in README.read_text()


def _params():
    params = []
    for cmd in documented_commands():
        marks = []
        if cmd.text in XFAIL:
            marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[cmd.text]))
        params.append(pytest.param(cmd, id=cmd.id, marks=marks))
    return params


@pytest.mark.slow
@pytest.mark.parametrize("cmd", _params())
def test_documented_command(cmd, sandbox):
    skip = excluded(cmd)
    if skip is not None:
        reason, cheap = skip
        if cheap is None:
            pytest.skip(f"EXCLUDED: {reason}")
        rc, log, _ = sandbox.call(shlex.split(cheap))
        assert rc == 0, log
        suite = re.search(r"^sct-bench --suite (\w+)", cmd.text)
        if suite:  # the documented suite exists
            assert f"suite {suite.group(1)}:" in log, log
        return
    planned = Planned(cmd, rewrite(cmd))
    rc, log, wall = sandbox.run(planned)
    print(f"{planned.line}\n-> exit {rc} in {wall:.1f}s")
    allowed = next((codes for pattern, codes, _ in EXPECTED_EXIT
                    if re.search(pattern, cmd.text)), (0,))
    assert rc in allowed, f"{cmd.source}: {cmd.text}\nran: {planned.line}\nexit {rc}\n{log[-4000:]}"
    if rc != 0:
        missing = [o for o in outputs(planned.argv) if not (sandbox.root / o).exists()]
        assert not missing, f"exit {rc} and {missing} not written\n{log[-4000:]}"


if __name__ == "__main__":  # prints the collected commands and what runs in their place
    for c in documented_commands():
        skip = excluded(c)
        print(f"{c.source}: {c.text}\n    -> " +
              (f"EXCLUDED ({skip[0]})" if skip else shlex.join(rewrite(c))))
