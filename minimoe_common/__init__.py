"""What every stage shares: the dataclass-config command lines and one-line input errors (cli), the tokenizer
and its fingerprint (tokenizer), files written whole and readable by others (files). Light to import: no torch."""
