"""Export a trained checkpoint for deployment: TorchScript, ONNX, and a deploy-ready bundle folder.

* ``torchscript``: ``model.ts`` through MONAI's ``ckpt_export``, with ``metadata.json`` and the
  config files embedded (``extra/*.json`` in the archive, as the MONAI Deploy App SDK reads them).
  Scripting is tried first; MSA2-Net does not script (its CSWin blocks use tensor methods
  TorchScript lacks), so the fallback traces at ``(1, in_channels, *spatial_size)``. While tracing,
  every SACM runs its batch-agnostic ``sum`` form, so the trace runs at any batch size.
* ``onnx``: ``model.onnx`` through :func:`onnx_model` (MONAI's ``convert_to_onnx``, legacy
  TorchScript-based exporter, which needs no ``onnxscript``), with a dynamic batch axis on input
  ``image`` and output ``pred``; the metadata and configs are stored in the model's ``metadata_props``.
  :func:`onnx_model` is also what the CPU backends (:mod:`msa2net.backends`) export with, into their
  own cache folder: they never write ``models/model.onnx``.
* ``deploy_bundle``: a stand-alone bundle folder (:func:`msa2net.bundle_tools.export_bundle`) plus
  ``models/model.pt``, ``models/model.ts`` and ``configs/deploy.json`` (profile and overrides, read
  after ``inference.json``): what the MONAI Deploy application in ``deploy/app`` loads.

Every export is checked before it is reported done: the exported model runs at batch sizes other
than the one it was exported with and matches the eager network's logits within ``atol``
(defaults 1e-4 TorchScript, 1e-3 ONNX Runtime); a failed check raises and leaves no file.

Command line (``python -m msa2net.export <command> ...``)::

    python -m msa2net.export torchscript --ckpt bundle/models/model.pt --out bundle/models/model.ts
    python -m msa2net.export onnx --ckpt bundle/models/model.pt --out bundle/models/model.onnx
    python -m msa2net.export deploy_bundle dist/msa2net_bundle --ckpt bundle/models/model.pt --profile profile_synapse.json

Extra ``--key value`` flags override config ids (e.g. ``--model_preset tiny``), as in ``monai.bundle``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from msa2net.atomic import atomic_path, atomic_write_bytes
from msa2net.bundle_tools import class_table, default_bundle_dir, export_bundle, metadata_with_classes
from msa2net.inference import load_weights

__all__ = ["torchscript", "onnx", "onnx_model", "deploy_bundle", "check_exported", "DEPLOY_CONFIG", "ONNX_INPUT", "ONNX_OUTPUT"]

logger = logging.getLogger(__name__)

#: Config written into a deploy bundle and read after ``inference.json`` by the Deploy application.
DEPLOY_CONFIG = "deploy.json"
#: Batch sizes every export is checked at (it is exported at batch 1).
CHECK_BATCH_SIZES = (2, 3)
#: ONNX input and output names and the default opset of every ONNX export.
ONNX_INPUT, ONNX_OUTPUT, ONNX_OPSET = "image", "pred", 17


def _config_paths(bundle_dir: Path, configs: Sequence[str], profile: str | None) -> list[str]:
    names = list(configs) + ([profile] if profile else [])
    paths = []
    for name in names:
        path = Path(name) if Path(name).is_absolute() else bundle_dir / "configs" / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: bundle config not found.")
        paths.append(str(path))
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) != len(stems):
        raise ValueError(f"config files {paths} share a file name; ckpt_export stores each under its name.")
    return paths


@contextmanager
def _importable(bundle_dir: Path) -> Iterator[None]:
    """Let the configs import modules shipped in the bundle folder (looked up after installed ones)."""
    root = str(bundle_dir.resolve())
    added = root not in sys.path
    if added:
        sys.path.append(root)
    try:
        yield
    finally:
        if added and root in sys.path:
            sys.path.remove(root)


def _parser(bundle_dir: Path, config_files: Sequence[str], overrides: Mapping):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(f=list(config_files))
    parser.read_meta(f=str(bundle_dir / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle_dir)
    for k, v in overrides.items():
        parser[k] = v
    return parser


def _key_in_ckpt(ckpt: str) -> str:
    """``"model"`` for the bundle's ``{"model": state_dict}`` checkpoints, ``""`` for a bare state dict."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return "model" if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping) else ""


def _eager_network(parser, ckpt: str) -> torch.nn.Module:
    net = parser.get_parsed_content("network_def", instantiate=True)
    load_weights(net, ckpt)
    return net.eval()


def _input_shape(parser) -> tuple[int, ...]:
    return (1, int(parser.get_parsed_content("in_channels")), *(int(s) for s in parser.get_parsed_content("spatial_size")))


def check_exported(
    run, net: torch.nn.Module, input_shape: Sequence[int], atol: float, batch_sizes: Sequence[int] = CHECK_BATCH_SIZES
) -> float:
    """Run ``run(x) -> logits`` and the eager ``net`` on random inputs of ``batch_sizes``; return the max abs difference.

    Raises ``AssertionError`` naming the batch size where the difference exceeds ``atol`` times the
    largest eager logit (at least 1): float32 rounding grows with the logits, which trained weights
    make large (tens), so a fixed bound would fail a correct export.
    """
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for b in batch_sizes:
        x = torch.rand((b, *input_shape[1:]), generator=gen)
        with torch.no_grad():
            ref = net(x).float().numpy()
            out = np.asarray(run(x), dtype=np.float32)
        if out.shape != ref.shape:
            raise AssertionError(f"batch {b}: exported model gave shape {out.shape}, eager {ref.shape}.")
        diff = float(np.abs(out - ref).max())
        scale = max(1.0, float(np.abs(ref).max()))
        if not diff <= atol * scale:
            raise AssertionError(f"batch {b}: exported logits differ from eager by {diff:.3g} > {atol:g} x {scale:.3g} (largest logit).")
        worst = max(worst, diff)
    return worst


def _export_paths(ckpt, out, bundle_dir, configs, profile, default_name: str):
    """Bundle folder, config files, output path (its folder created) and checkpoint key of an export."""
    bundle = Path(bundle_dir) if bundle_dir else default_bundle_dir()
    files = _config_paths(bundle, configs, profile)
    out_path = Path(out) if out else bundle / "models" / default_name
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return bundle, files, out_path, _key_in_ckpt(ckpt)


def _export_kwargs(bundle: Path, files: list[str], out_path: Path, ckpt: str, key: str, overrides: Mapping) -> dict:
    """Arguments that MONAI's ``ckpt_export`` and ``onnx_export`` share."""
    return dict(
        net_id="network_def",
        filepath=str(out_path),
        ckpt_file=str(ckpt),
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=files,
        key_in_ckpt=key,
        bundle_root=str(bundle),
        **overrides,
    )


def torchscript(
    ckpt: str,
    out: str | None = None,
    bundle_dir: str | None = None,
    configs: Sequence[str] = ("inference.json",),
    profile: str | None = None,
    mode: str = "auto",
    atol: float = 1e-4,
    **overrides,
) -> str:
    """Export ``ckpt`` to TorchScript with MONAI's ``ckpt_export``; returns the written path.

    Args:
        ckpt: checkpoint (``{"model": state_dict}`` as the bundle's trainer saves, or a bare state dict).
        out: output file (default ``<bundle_dir>/models/model.ts``).
        bundle_dir: bundle folder holding ``configs/`` (default: this checkout's ``bundle/``).
        configs: config files under ``configs/`` defining ``network_def``; all are embedded.
        profile: optional profile under ``configs/`` (e.g. ``profile_synapse.json``), read last.
        mode: ``"auto"`` (script, falling back to trace), ``"script"`` or ``"trace"``.
        atol: tolerance of the check against the eager network.
        overrides: config ids to override (``model_preset="tiny"``, ...).
    """
    from monai.bundle import ckpt_export

    if mode not in ("auto", "script", "trace"):
        raise ValueError(f"mode must be 'auto', 'script' or 'trace', got {mode!r}.")
    bundle, files, out_path, key = _export_paths(ckpt, out, bundle_dir, configs, profile, "model.ts")
    with _importable(bundle):
        parser = _parser(bundle, files, overrides)
        shape = _input_shape(parser)
        net = _eager_network(parser, ckpt)
        common = _export_kwargs(bundle, files, out_path, ckpt, key, overrides)
        attempts = {"auto": (False, True), "script": (False,), "trace": (True,)}[mode]
        for use_trace in attempts:
            how = "trace" if use_trace else "script"
            try:
                ckpt_export(use_trace=use_trace, input_shape=list(shape) if use_trace else None, **common)
                ts = torch.jit.load(str(out_path), map_location="cpu").eval()
                diff = check_exported(lambda x, ts=ts: ts(x).numpy(), net, shape, atol)
            except Exception as err:  # scripting MSA2-Net fails; a failed check must not leave a file behind
                out_path.unlink(missing_ok=True)
                if use_trace or mode != "auto":
                    raise
                first_line = next((line for line in str(err).splitlines() if line.strip()), "")
                logger.info("TorchScript scripting failed (%s: %s); tracing at %s", type(err).__name__, first_line[:200], shape)
                continue
            logger.info("TorchScript (%s) written to %s; max |diff| vs eager at batch %s: %.2g", how, out_path, CHECK_BATCH_SIZES, diff)
            return str(out_path)
    raise RuntimeError("unreachable")  # pragma: no cover


def onnx_model(
    net: torch.nn.Module, input_shape: Sequence[int], opset: int = ONNX_OPSET, metadata: Mapping[str, str] | None = None, atol: float = 1e-3
) -> bytes:
    """The one ONNX exporter: ``net`` traced at ``input_shape`` with a dynamic batch axis, checked, serialised.

    MONAI's ``convert_to_onnx`` traces with the legacy TorchScript-based exporter (which needs no
    ``onnxscript``). Input ``image`` ``(batch, C, H, W)``, output ``pred`` ``(batch, num_classes, H, W)``;
    ``C, H, W`` are fixed at ``input_shape``. ``metadata`` goes into the model's ``metadata_props``.
    The model is checked with ONNX Runtime against the eager network at batch sizes
    :data:`CHECK_BATCH_SIZES` (``AssertionError`` beyond ``atol``) before its bytes are returned.
    """
    import onnxruntime as ort
    from monai.networks import convert_to_onnx

    model = convert_to_onnx(
        net.eval(),
        [torch.rand(tuple(input_shape))],
        input_names=[ONNX_INPUT],
        output_names=[ONNX_OUTPUT],
        opset_version=int(opset),
        dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
        use_trace=True,
        dynamo=False,
    )
    for k, v in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    blob = model.SerializeToString()
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    check_exported(lambda x: session.run(None, {ONNX_INPUT: x.numpy()})[0], net, input_shape, atol)
    return blob


def onnx(
    ckpt: str,
    out: str | None = None,
    bundle_dir: str | None = None,
    configs: Sequence[str] = ("inference.json",),
    profile: str | None = None,
    opset: int = ONNX_OPSET,
    atol: float = 1e-3,
    **overrides,
) -> str:
    """Export ``ckpt`` to ONNX with :func:`onnx_model`; returns the written path.

    ``H, W`` are fixed at the config's ``spatial_size``. The bundle metadata and configs are stored in
    ``metadata_props`` (keys ``metadata.json`` and each config file's name). The file is written only
    after the check passed, under a temporary name that is then renamed.
    """
    bundle, files, out_path, _ = _export_paths(ckpt, out, bundle_dir, configs, profile, "model.onnx")
    with _importable(bundle):
        parser = _parser(bundle, files, overrides)
        props = {"metadata.json": json.dumps(parser.get("_meta_"))}
        props.update({Path(f).name: Path(f).read_text() for f in files})
        blob = onnx_model(_eager_network(parser, ckpt), _input_shape(parser), opset, props, atol)
    atomic_write_bytes(out_path, blob)
    logger.info("ONNX (opset %d) written to %s; checked against eager at batch %s within %g", opset, out_path, CHECK_BATCH_SIZES, atol)
    return str(out_path)


def deploy_bundle(
    out_dir: str,
    ckpt: str,
    profile: str | None = None,
    bundle_dir: str | None = None,
    extra_files: Sequence[str] = (),
    overwrite: bool = False,
    **overrides,
) -> str:
    """Write the bundle folder the MONAI Deploy application loads; returns its path.

    ``out_dir`` gets what :func:`msa2net.bundle_tools.export_bundle` writes (configs, docs, the
    ``msa2net`` package), ``models/model.pt`` (a copy of ``ckpt``), ``configs/deploy.json`` (the
    profile's content with ``overrides`` on top; read after ``inference.json``) and ``models/model.ts``
    exported from ``inference.json`` + ``deploy.json``, both embedded. ``extra_files`` (e.g. a module
    defining a custom ``network_def``) are copied to the folder's root, which is importable by the configs.
    """
    src = Path(bundle_dir) if bundle_dir else default_bundle_dir()
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass overwrite=True to replace it.")
    with atomic_path(out, replace_dir=True) as staged:
        export_bundle(staged, src)
        for f in extra_files:
            shutil.copy2(f, staged / Path(f).name)
        deploy = json.loads((src / "configs" / profile).read_text()) if profile else {}
        deploy.update(overrides)
        (staged / "configs" / DEPLOY_CONFIG).write_text(json.dumps(deploy, indent=2) + "\n")
        # The metadata states the classes the configs run with (the Deploy app reads them from the configs).
        configs = [str(staged / "configs" / n) for n in ("inference.json", DEPLOY_CONFIG)]
        table = class_table(_parser(staged, configs, {}), " + ".join(configs))
        meta_file = staged / "configs" / "metadata.json"
        meta = metadata_with_classes(json.loads(meta_file.read_text()), table[1:], deploy.get("in_channels"))
        meta_file.write_text(json.dumps(meta, indent=4) + "\n")
        (staged / "models").mkdir(exist_ok=True)
        for stale in ("model.pt", "model.ts", "model.onnx"):
            (staged / "models" / stale).unlink(missing_ok=True)
        shutil.copy2(ckpt, staged / "models" / "model.pt")
        torchscript(str(staged / "models" / "model.pt"), bundle_dir=str(staged), configs=("inference.json", DEPLOY_CONFIG))
    logger.info("deploy bundle written to %s", out)
    return str(out)


def main() -> None:
    import fire

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fire.Fire(
        {"torchscript": torchscript, "onnx": onnx, "deploy_bundle": deploy_bundle},
        serialize=lambda result: print(result) if isinstance(result, str) else None,
    )


if __name__ == "__main__":
    main()
