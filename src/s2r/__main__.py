"""`python -m s2r ...` (what `torchrun ... -m s2r train METHOD ...` runs in every process): the `s2r` command."""

from s2r.cli import main

if __name__ == "__main__":
    main(prog_name="s2r")
