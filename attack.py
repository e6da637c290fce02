"""`python attack.py run_dir=PATH attack=relearn|prompt [attack.key=value ...]`: does it stay erased?"""
from unlearn.attacks.run import main

if __name__ == "__main__":
    main()
