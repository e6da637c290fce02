"""`python train.py [group=option ...] [key=value ...]`: one unlearning run (Hydra entry point)."""
from unlearn.cli import main

if __name__ == "__main__":
    main()
