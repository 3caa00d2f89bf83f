"""Entry point for ``python deploy/app -i ... -o ... -m ...`` and for the MAP (``monai-deploy package deploy/app``)."""

from command import main

if __name__ == "__main__":
    main()
