"""``python -m dtem_lightning`` runs the ``dtem`` command."""

from dtem_lightning.cli import main

if __name__ == "__main__":
    main()
