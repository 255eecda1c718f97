"""`python -m generator ARGS` is `gen-repo ARGS` (e.g. `mpirun -n 2 python -m generator run ...`)."""

from generator.cli import main

if __name__ == "__main__":
    main(prog_name="gen-repo")
