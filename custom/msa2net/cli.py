"""``msa2net`` command line: demo, publishing a run's model, bundle and model export, data preparation, synthetic data."""

from __future__ import annotations

import fire

from msa2net import export
from msa2net.bundle_tools import export_bundle
from msa2net.data.prepare import main as prepare
from msa2net.data.synthetic import make_rgb_dataset, make_volume_dataset
from msa2net.demo import run_demo
from msa2net.publish import publish


def main() -> None:
    fire.Fire(
        {
            "demo": run_demo,
            "publish": publish,
            "export-bundle": export_bundle,
            "export-torchscript": export.torchscript,
            "export-onnx": export.onnx,
            "deploy-bundle": export.deploy_bundle,
            "prepare": prepare,
            "synthetic-volumes": make_volume_dataset,
            "synthetic-rgb": make_rgb_dataset,
        },
        serialize=lambda result: print(result) if isinstance(result, str) else None,
    )


if __name__ == "__main__":
    main()
